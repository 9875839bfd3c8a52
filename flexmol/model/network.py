"""FlexMol: 2D and 3D encoders with shared self-attention, cross-modal decoders, feature learners,
a multi-modal encoder and the pre-training heads. Reads top to bottom like METHOD.md."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flexmol.model.heads import AtomTypeHead, CoordinateHead, DistanceHead, SPDHead, masked_mean
from flexmol.model.inputs import AtomEmbedding2D, Input3D, PairBias2D
from flexmol.model.layers import FeedForward, PairTransformer, SharedAttention, encode_jointly


@dataclass
class ModelConfig:
    """Sizes; the presets are ``flexmol/configs/model/{tiny,small,base}.yaml`` (shipped in the package)."""

    dim: int = 64  # d
    heads: int = 4  # H
    layers: int = 2  # F, per encoder (their attention is shared)
    decoder_layers: int = 1  # F_d, per cross-modal decoder
    mm_layers: int = 1  # F_m, multi-modal encoder
    ffn_mult: int = 4
    dropout: float = 0.0
    num_kernels: int = 128  # K Gaussian kernels
    max_spd: int = 8  # SPD classes 0..max_spd, plus one for "farther or unreachable"
    max_path: int = 5  # edges averaged along a shortest path for the 2D pair bias
    proj_dim: int = 128  # contrastive projection


# The least value of each size; decoder_layers and mm_layers may be 0 (the decoders are then their
# output projections, the multi-modal encoder the sum of the two encoders' outputs, layer-normed).
MINIMUM = {"dim": 1, "heads": 1, "layers": 1, "decoder_layers": 0, "mm_layers": 0, "ffn_mult": 1, "num_kernels": 1,
           "max_spd": 1, "max_path": 1, "proj_dim": 1}


def validate_model(cfg: ModelConfig) -> None:
    """Refuse sizes the network cannot be built with, naming the key (:class:`ConfigError`)."""
    from flexmol.config import ConfigError

    for key, least in MINIMUM.items():
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"config key '{key}': must be an integer of at least {least}, got {value!r}")
    if cfg.max_spd > 254:  # the stored distance tables are uint8, 255 meaning "255 or more, or no path"
        raise ConfigError(f"config key 'max_spd': must be at most 254, got {cfg.max_spd}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"config key 'dropout': must be in [0, 1), got {cfg.dropout!r}")
    if cfg.dim % cfg.heads:
        raise ConfigError(f"config keys 'dim' and 'heads': dim {cfg.dim} is not divisible by heads {cfg.heads} "
                          "(each head takes dim / heads channels)")


class FeatureLearner(nn.Module):
    """An MLP from one modality's atom representation to the other's (2D-FL: y -> x~, 3D-FL: x -> y~).
    Trained on paired data in stage 1; frozen teachers of the decoders in stage 2."""

    def __init__(self, dim: int, mult: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), FeedForward(dim, mult))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class FeatureLearner2D(FeatureLearner):
    """2D-FL: approximates the 2D input representation x from the 3D one y."""


class FeatureLearner3D(FeatureLearner):
    """3D-FL: approximates the 3D input representation y from the 2D one x."""


class CrossModalDecoder(nn.Module):
    """Generates the *input* representation (atoms [B, N, d], pairs [B, N, N, H]) of the missing
    modality from the other encoder's output; it then runs through that modality's encoder."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.body = PairTransformer(cfg.dim, cfg.heads, cfg.decoder_layers, cfg.ffn_mult, cfg.dropout)
        self.atom_out = nn.Linear(cfg.dim, cfg.dim)
        self.pair_out = nn.Linear(cfg.heads, cfg.heads)

    def forward(self, h, pair, mask):
        h, pair = self.body(h, pair, mask)
        return self.atom_out(h), self.pair_out(pair)


class Decoder2Dto3D(CrossModalDecoder):
    """D_2->3 (x^(F), P^(F)) -> (y^, Q^)."""


class Decoder3Dto2D(CrossModalDecoder):
    """D_3->2 (y^(F), Q^(F)) -> (x^, P^)."""


class MultiModalEncoder(nn.Module):
    """Fuses the aligned encoder outputs (real or generated): atoms x^(F) + y^(F) (atom order is
    shared), pairs P^(F) + Q^(F), then F_m layers with their own attention (Transformer-M)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.body = PairTransformer(cfg.dim, cfg.heads, cfg.mm_layers, cfg.ffn_mult, cfg.dropout)

    def forward(self, x_f, p_f, y_f, q_f, mask):
        return self.body(x_f + y_f, p_f + q_f, mask)


class FlexMol(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        d, h = cfg.dim, cfg.heads
        # input representations
        self.atom_2d = AtomEmbedding2D(d)
        self.pair_2d = PairBias2D(h, cfg.max_spd)
        self.input_3d = Input3D(d, h, cfg.num_kernels)
        # encoders: one SharedAttention per layer, used by both
        self.shared_attention = nn.ModuleList(SharedAttention(d, h, cfg.dropout) for _ in range(cfg.layers))
        self.encoder_2d = PairTransformer(d, h, cfg.layers, cfg.ffn_mult, cfg.dropout, attentions=self.shared_attention)
        self.encoder_3d = PairTransformer(d, h, cfg.layers, cfg.ffn_mult, cfg.dropout, attentions=self.shared_attention)
        # cross-modal parts
        self.fl_2d = FeatureLearner2D(d)
        self.fl_3d = FeatureLearner3D(d)
        self.decoder_2to3 = Decoder2Dto3D(cfg)
        self.decoder_3to2 = Decoder3Dto2D(cfg)
        self.mm_encoder = MultiModalEncoder(cfg)
        # heads
        self.proj_2d = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.proj_dim))
        self.proj_3d = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.proj_dim))
        self.atom_head = AtomTypeHead(d)
        self.coord_head = CoordinateHead(h)
        self.spd_head = SPDHead(h, cfg.max_spd + 2)
        self.dist_head = DistanceHead(h)

    # -- input representations ---------------------------------------------------------------
    def input_2d(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # ``atom_masked`` [B, N] (pre-training only): those atoms' tokens are the mask token
        x = self.atom_2d(batch["atom_feat"], batch.get("atom_masked"))
        return x, self.pair_2d(batch["spd"], batch["path_edges"], batch["edge_feat"])

    def input_3d_repr(self, batch: dict, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.input_3d(batch["z"], pos, batch["mask"])

    # -- the forward pass ----------------------------------------------------------------------
    def forward(self, batch: dict, pos: torch.Tensor | None = None, decode: bool = True) -> dict:
        """Run whatever the batch's modality allows. ``batch["modality"]`` is ``paired``, ``2d`` or
        ``3d``; ``pos`` overrides ``batch["pos"]`` (e.g. noised coordinates).

        Returns the input representations (``x``, ``P``, ``y``, ``Q``; generated ones as ``x_hat``,
        ``P_hat``, ``y_hat``, ``Q_hat``), encoder outputs (``x_f``, ``P_f``, ``y_f``, ``Q_f``), the
        fused ``h`` [B, N, d] and ``pair`` [B, N, N, H], and ``embedding`` [B, d].
        """
        modality, mask = batch["modality"], batch["mask"]
        out: dict = {}
        if modality in ("paired", "2d"):
            out["x"], out["P"] = self.input_2d(batch)
        if modality in ("paired", "3d"):
            out["y"], out["Q"] = self.input_3d_repr(batch, batch["pos"] if pos is None else pos)
        if modality == "paired":
            out["x_f"], out["P_f"], out["y_f"], out["Q_f"] = encode_jointly(
                self.encoder_2d, self.encoder_3d, out["x"], out["P"], out["y"], out["Q"], mask)
        elif modality == "2d":
            out["x_f"], out["P_f"] = self.encoder_2d(out["x"], out["P"], mask)
        else:
            out["y_f"], out["Q_f"] = self.encoder_3d(out["y"], out["Q"], mask)
        # With both modalities present the decoders only serve the consistency loss.
        if modality == "2d" or (modality == "paired" and decode):
            out["y_hat"], out["Q_hat"] = self.decoder_2to3(out["x_f"], out["P_f"], mask)
        if modality == "3d" or (modality == "paired" and decode):
            out["x_hat"], out["P_hat"] = self.decoder_3to2(out["y_f"], out["Q_f"], mask)
        if modality == "2d":  # the generated 3D input runs through the 3D encoder like a real one
            out["y_f"], out["Q_f"] = self.encoder_3d(out["y_hat"], out["Q_hat"], mask)
        if modality == "3d":
            out["x_f"], out["P_f"] = self.encoder_2d(out["x_hat"], out["P_hat"], mask)
        out["h"], out["pair"] = self.mm_encoder(out["x_f"], out["P_f"], out["y_f"], out["Q_f"], mask)
        out["embedding"] = masked_mean(out["h"], mask)
        return out

    def embed(self, batch: dict) -> torch.Tensor:
        """Pooled molecule embedding [B, d] for any modality."""
        return self.forward(batch, decode=False)["embedding"]

    # -- embedding spaces ----------------------------------------------------------------------
    # The batch modalities this network takes, and the spaces each gives: the 2D and 3D encoders'
    # outputs (``_generated`` where the encoder ran on a decoder's output) and the fused one.
    input_modalities = ("2d", "3d", "paired")
    SPACES = {"2d": ("2d", "3d_generated", "fused"), "3d": ("3d", "2d_generated", "fused"),
              "paired": ("2d", "3d", "fused")}

    def space_names(self, modality: str) -> tuple[str, ...]:
        """The names :meth:`spaces` gives for a batch of ``modality``, in its order."""
        return self.SPACES[modality]

    def spaces(self, batch: dict, atoms: bool = False) -> dict[str, torch.Tensor]:
        """Every embedding space of the batch's molecules, by name (:meth:`space_names`): the 2D
        encoder's output ``x_f`` (``2d``, or ``2d_generated`` for a 3D batch), the 3D encoder's
        ``y_f`` (``3d``, or ``3d_generated`` for a 2D batch) and the multi-modal encoder's ``h``
        (``fused``; pooled, the :meth:`embed` embedding). Pooled [B, d] as the mean over the atoms,
        or per atom [B, N, d] (padding rows zero) with ``atoms``. The forward pass is the one
        :meth:`embed` runs; nothing of it changes."""
        out = self.forward(batch, decode=False)
        mask = batch["mask"]
        names = self.space_names(batch["modality"])
        encoders = (out["x_f"], out["y_f"]) if batch["modality"] != "3d" else (out["y_f"], out["x_f"])
        tensors = encoders + (out["h"],)
        if atoms:
            return {name: t * mask.unsqueeze(-1).to(t.dtype) for name, t in zip(names, tensors)}
        pooled = {name: masked_mean(t, mask) for name, t in zip(names[:2], tensors[:2])}
        return {**pooled, "fused": out["embedding"]}
