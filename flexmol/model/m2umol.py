"""The M2UMol network (METHOD.md, "M2UMol"): this project's 2D encoder, one encoder per target
modality, one adapter per target modality from the 2D embedding into that modality's space, the
modality classifier over the adapters' outputs, and the 2D-only embedding that attends over them.

The 2D encoder is FlexMol's, part for part and under the same module names (``atom_2d``,
``pair_2d``, ``shared_attention``, ``encoder_2d``), and so is the 3D encoder of a ``conformer``
modality (``input_3d``, ``encoder_3d``, sharing the attention of the 2D encoder as in FlexMol): a
FlexMol export's encoder weights load into it by name. With ``encoder: graphgps`` the 2D encoder
is M2UMol's own, GraphGPS (:class:`GraphGPS`, module ``gps``; its ``P_f`` is None: it has no pair
channel), and the 3D encoder keeps ``shared_attention`` to itself. A ``vector`` modality (numeric record
labels: QM9's properties, descriptors, a text embedding computed elsewhere) is standardised with
mean/std buffers set from the data, then an MLP takes it to the model's width.

Only the 2D encoder runs at inference: :meth:`M2UMol.forward` on a 2D batch gives the pooled 2D
embedding, each adapter's output and ``embedding``, the 2D embedding plus its attention over the
adapters' outputs (M2UMol's fine-tuning embedding). Pre-training has no loss on that attention
(``fusion``); its output projection starts at zero, so before fine-tuning trains it the embedding
is the 2D encoder's, and fine-tuning (LoRA included: :attr:`M2UMol.finetune_modules`) trains it
whole.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn

from flexmol.model.heads import masked_mean
from flexmol.model.inputs import AtomEmbedding2D, Input3D, PairBias2D
from flexmol.model.layers import PairTransformer, SharedAttention, encode_jointly
from flexmol.model.network import ModelConfig, validate_model

RECIPE = "m2umol"
KINDS = ("conformer", "vector")
ENCODERS = ("flexmol", "graphgps")
# Modality names: words of letters, digits, '_' and '-'; the spaces of a 2D batch keep their names.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
RESERVED = ("2d", "fused")


@dataclass
class ModalitySpec:
    """One target modality of a built network (``model.yaml``'s ``modalities``)."""

    kind: str = "vector"  # conformer | vector
    dim: int = 0  # vector: the number of values (len(labels)); conformer: 0
    labels: List[str] = field(default_factory=list)  # vector: the record label keys, in column order
    hidden: int = 0  # vector: the encoder MLP's hidden width (0: the model's width)


@dataclass
class M2UMolModelConfig(ModelConfig):
    """The sizes of an M2UMol network: FlexMol's (of which it uses the encoders' ``dim``, ``heads``,
    ``layers``, ``ffn_mult``, ``dropout``, ``num_kernels``, ``max_spd``, ``max_path``) and its
    target modalities by name, in the order of the classifier's classes."""

    recipe: str = RECIPE
    encoder: str = "flexmol"  # the 2D encoder: flexmol (FlexMol's) | graphgps (GraphGPS, torch-geometric)
    walk_length: int = 20  # graphgps: random-walk steps of the structural encoding (RWSE)
    pe_dim: int = 8  # graphgps: the RWSE's share of the atom input's width
    modalities: Dict[str, ModalitySpec] = field(default_factory=dict)


def validate_m2umol_model(cfg: M2UMolModelConfig) -> None:
    """Refuse a network description that cannot be built, naming the key (:class:`ConfigError`)."""
    from flexmol.config import ConfigError

    validate_model(cfg)
    if cfg.recipe != RECIPE:
        raise ConfigError(f"config key 'recipe': {cfg.recipe!r} is not {RECIPE}")
    if cfg.encoder not in ENCODERS:
        raise ConfigError(f"config key 'encoder': {cfg.encoder!r} is not one of {', '.join(ENCODERS)}")
    if cfg.encoder == "graphgps":
        if cfg.walk_length < 1:
            raise ConfigError(f"config key 'walk_length': must be at least 1, got {cfg.walk_length}")
        if not 1 <= cfg.pe_dim < cfg.dim:
            raise ConfigError(f"config key 'pe_dim': must be at least 1 and below dim {cfg.dim}, got {cfg.pe_dim}")
    if not cfg.modalities:
        raise ConfigError("config key 'modalities': no target modality")
    conformers = [m for m, s in cfg.modalities.items() if s.kind == "conformer"]
    if len(conformers) > 1:
        raise ConfigError(f"config key 'modalities': {len(conformers)} conformer modalities ({', '.join(conformers)}); "
                          "there is one 3D encoder")
    for name, spec in cfg.modalities.items():
        key = f"modalities.{name}"
        if not NAME.fullmatch(name) or name in RESERVED or hasattr(nn.ModuleDict(), name):
            raise ConfigError(f"config key '{key}': {name!r} cannot name a modality (letters, digits, '_' and '-'; "
                              f"not {', '.join(RESERVED)} or a module attribute)")
        if spec.kind not in KINDS:
            raise ConfigError(f"config key '{key}.kind': {spec.kind!r} is not one of {', '.join(KINDS)}")
        if spec.kind == "vector":
            if spec.dim < 1 or spec.dim != len(spec.labels):
                raise ConfigError(f"config key '{key}.dim': {spec.dim} for {len(spec.labels)} label(s)")
            if spec.hidden < 0:
                raise ConfigError(f"config key '{key}.hidden': must be 0 (the model's width) or more, got {spec.hidden}")
        elif spec.dim or spec.labels:
            raise ConfigError(f"config key '{key}': a conformer modality has no dim or labels")


class GraphGPS(nn.Module):
    """M2UMol's 2D encoder: GraphGPS layers (a GINE message-passing layer and multi-head global
    attention side by side, batch norms, an MLP; :class:`torch_geometric.nn.GPSConv`) over the
    atoms, whose input is the sum of the atom feature embeddings (FlexMol's
    :class:`~flexmol.model.inputs.AtomEmbedding2D`, ``dim - pe_dim`` wide) beside a linear map of
    the random-walk structural encoding (the return probabilities of 1..``walk_length``-step
    random walks, batch-normed), and bond embeddings on the edges.

    It reads the padded 2D batch (:func:`flexmol.data.collate.collate`): the bonds are the atom
    pairs at distance 1, each with its bond (the first step of its path), and returns the atoms
    [B, N, d] (padding rows zero)."""

    def __init__(self, dim: int, heads: int, layers: int, walk_length: int, pe_dim: int, dropout: float = 0.0):
        super().__init__()
        from torch_geometric.nn import GINEConv, GPSConv

        from flexmol.chem.vocab import BOND_FEATURE_SIZES

        self.walk_length = walk_length
        self.atom = AtomEmbedding2D(dim - pe_dim)
        self.pe_norm = nn.BatchNorm1d(walk_length)
        self.pe = nn.Linear(walk_length, pe_dim)
        self.bond = nn.ModuleList(nn.Embedding(n, dim) for n in BOND_FEATURE_SIZES)
        self.layers = nn.ModuleList(
            GPSConv(dim, GINEConv(nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))), heads=heads,
                    dropout=dropout, attn_type="multihead")
            for _ in range(layers))

    def random_walk_encoding(self, adjacency: torch.Tensor) -> torch.Tensor:
        """[B, N, walk_length]: the probability that a random walk of k = 1..walk_length steps
        from an atom returns to it (0 for an atom without bonds)."""
        degree = adjacency.sum(-1, keepdim=True)
        step = adjacency / degree.clamp(min=1)
        walk, out = step, []
        for _ in range(self.walk_length):
            out.append(torch.diagonal(walk, dim1=-2, dim2=-1))
            walk = walk @ step
        return torch.stack(out, dim=-1)

    def forward(self, batch: dict) -> torch.Tensor:
        mask = batch["mask"]
        bonded = (batch["spd"] == 1) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
        rwse = self.random_walk_encoding(bonded.float())
        x = torch.cat([self.atom(batch["atom_feat"], batch.get("atom_masked"))[mask],
                       self.pe(self.pe_norm(rwse[mask]))], dim=-1)
        node = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
        node[mask] = torch.arange(int(mask.sum()), device=mask.device)
        b, i, j = bonded.nonzero(as_tuple=True)
        edge_index = torch.stack([node[b, j], node[b, i]])  # messages from j to i
        bond = batch["path_edges"][b, i, j, 0]
        edge_attr = sum(t(batch["edge_feat"][bond, k]) for k, t in enumerate(self.bond))
        graph = torch.arange(mask.shape[0], device=mask.device).repeat_interleave(mask.sum(-1))
        for layer in self.layers:
            x = layer(x, edge_index, graph, edge_attr=edge_attr)
        out = x.new_zeros(*mask.shape, x.shape[-1])
        out[mask] = x
        return out


class VectorEncoder(nn.Module):
    """A vector modality's encoder: (values - mean) / std, then Linear -> GELU -> Linear to the
    model's width. ``mean`` and ``std`` are buffers (saved with the weights), set from the
    training data before training (:meth:`set_statistics`)."""

    def __init__(self, width: int, hidden: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, dim))

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.net(((values.float() - self.mean) / self.std).to(self.net[0].weight.dtype))


class Adapter(nn.Sequential):
    """2D embedding -> one target modality's space: Linear(d -> d) + LayerNorm (M2UMol)."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim), nn.LayerNorm(dim))


class AdapterAttention(nn.Module):
    """The 2D-only embedding: the pooled 2D embedding plus its attention (as the query) over the
    adapters' outputs (keys and values). The output projection starts at zero."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.attention.out_proj.weight)
        nn.init.zeros_(self.attention.out_proj.bias)

    def forward(self, h: torch.Tensor, adapted: torch.Tensor) -> torch.Tensor:
        # h [B, d]; adapted [B, M, d]
        att, _ = self.attention(h.unsqueeze(1), adapted, adapted, need_weights=False)
        return h + att.squeeze(1)


class M2UMol(nn.Module):
    recipe = RECIPE
    finetune_modules = ("fusion",)  # trained whole in fine-tuning, whatever else LoRA freezes
    lora_modules: tuple[str, ...] = ()  # LoRA targets of its own beside the configured ones (GraphGPS's)

    def __init__(self, cfg: M2UMolModelConfig):
        super().__init__()
        validate_m2umol_model(cfg)
        self.cfg = cfg
        d, h = cfg.dim, cfg.heads
        self.conformer = next((m for m, s in cfg.modalities.items() if s.kind == "conformer"), None)
        if cfg.encoder == "flexmol" or self.conformer is not None:  # the attention of FlexMol's encoders
            self.shared_attention = nn.ModuleList(SharedAttention(d, h, cfg.dropout) for _ in range(cfg.layers))
        if cfg.encoder == "flexmol":  # the 2D encoder, as FlexMol's
            self.atom_2d = AtomEmbedding2D(d)
            self.pair_2d = PairBias2D(h, cfg.max_spd)
            self.encoder_2d = PairTransformer(d, h, cfg.layers, cfg.ffn_mult, cfg.dropout,
                                              attentions=self.shared_attention)
        else:
            self.gps = GraphGPS(d, h, cfg.layers, cfg.walk_length, cfg.pe_dim, cfg.dropout)
            # its message-passing and feed-forward projections (the attention's are fused inside
            # nn.MultiheadAttention, which LoRA cannot wrap)
            self.lora_modules = ("conv.nn.0", "conv.nn.2", "mlp.0", "mlp.3")
        if self.conformer is not None:  # the 3D encoder, its attention shared as in FlexMol
            self.input_3d = Input3D(d, h, cfg.num_kernels)
            self.encoder_3d = PairTransformer(d, h, cfg.layers, cfg.ffn_mult, cfg.dropout,
                                              attentions=self.shared_attention)
        self.encoders = nn.ModuleDict({m: VectorEncoder(s.dim, s.hidden or d, d)
                                       for m, s in cfg.modalities.items() if s.kind == "vector"})
        self.adapters = nn.ModuleDict({m: Adapter(d) for m in cfg.modalities})
        self.classifier = nn.Linear(d, len(cfg.modalities))
        self.fusion = AdapterAttention(d, h)

    @property
    def modalities(self) -> list[str]:
        """The target modalities, in the classifier's class order."""
        return list(self.cfg.modalities)

    @property
    def input_modalities(self) -> tuple[str, ...]:
        """The batch modalities the network takes: 2D, and with a conformer modality 3D and paired."""
        return ("2d", "3d", "paired") if self.conformer is not None else ("2d",)

    def space_names(self, modality: str) -> tuple[str, ...]:
        """The names :meth:`spaces` gives for a batch of ``modality``, in its order."""
        graph = ("2d", "fused") + tuple(f"adapter_{m}" for m in self.modalities)
        return {"2d": graph, "paired": graph + ("3d",), "3d": ("3d",)}[modality]

    def _check_modality(self, modality: str) -> None:
        if modality not in self.input_modalities:
            raise ValueError(f"this M2UMol network takes {', '.join(self.input_modalities)} batches (it has "
                             f"{'no conformer modality' if self.conformer is None else 'a conformer modality'}), "
                             f"not {modality}")

    def forward(self, batch: dict, decode: bool = False) -> dict:
        """Run what the batch's modality allows (``decode`` is FlexMol's argument; nothing here
        decodes). A 2D or paired batch gives the 2D encoder's ``x_f``, ``P_f``, its pooled
        ``h_2d`` [B, d], ``adapted`` {modality: [B, d]} and ``embedding`` [B, d] (the 2D-only
        embedding); a 3D or paired batch the 3D encoder's ``y_f``, ``Q_f`` and pooled ``h_3d``
        [B, d] (the conformer modality's encoding). A 3D batch's ``embedding`` is ``h_3d``."""
        modality, mask = batch["modality"], batch["mask"]
        self._check_modality(modality)
        out: dict = {}
        graph, geometry = modality in ("paired", "2d"), modality in ("paired", "3d")
        if graph and self.cfg.encoder == "flexmol":
            x = self.atom_2d(batch["atom_feat"], batch.get("atom_masked"))
            p = self.pair_2d(batch["spd"], batch["path_edges"], batch["edge_feat"])
        if geometry:
            y, q = self.input_3d(batch["z"], batch["pos"], mask)
        if graph and geometry and self.cfg.encoder == "flexmol":
            out["x_f"], out["P_f"], out["y_f"], out["Q_f"] = encode_jointly(self.encoder_2d, self.encoder_3d,
                                                                            x, p, y, q, mask)
        else:
            if graph:
                out["x_f"], out["P_f"] = self.encoder_2d(x, p, mask) if self.cfg.encoder == "flexmol" else \
                    (self.gps(batch), None)
            if geometry:
                out["y_f"], out["Q_f"] = self.encoder_3d(y, q, mask)
        if "y_f" in out:
            out["h_3d"] = masked_mean(out["y_f"], mask)
            out["embedding"] = out["h_3d"]
        if "x_f" in out:
            h = out["h_2d"] = masked_mean(out["x_f"], mask)
            out["adapted"] = {m: a(h) for m, a in self.adapters.items()}
            out["embedding"] = self.fusion(h, torch.stack(list(out["adapted"].values()), dim=1))
        return out

    def embed(self, batch: dict) -> torch.Tensor:
        """Pooled molecule embedding [B, d] (see :meth:`forward`)."""
        return self.forward(batch)["embedding"]

    def encode_vector(self, modality: str, values: torch.Tensor) -> torch.Tensor:
        """A vector modality's encoding [B, d] of its values [B, dim] (no NaN)."""
        return self.encoders[modality](values)

    def classify(self, adapted: dict[str, torch.Tensor]) -> torch.Tensor:
        """The modality classifier's logits [B, M, M] for the adapters' outputs, in class order."""
        return self.classifier(torch.stack([adapted[m] for m in self.modalities], dim=1))

    def spaces(self, batch: dict, atoms: bool = False) -> dict[str, torch.Tensor]:
        """Every embedding space of the batch's molecules, by name (:meth:`space_names`): ``2d``
        (the pooled 2D encoder output), ``fused`` (the 2D-only embedding), ``adapter_<modality>``
        (each adapter's output, in that modality's space) and ``3d`` (the pooled 3D encoder
        output, the conformer modality's space). [B, d] each, or with ``atoms`` per atom [B, N, d]
        (padding rows zero) for the spaces that have a per-atom form (``2d``, ``3d``)."""
        out = self.forward(batch)
        mask = batch["mask"].unsqueeze(-1)
        if atoms:
            per_atom = {"2d": out.get("x_f"), "3d": out.get("y_f")}
            return {k: v * mask.to(v.dtype) for k, v in per_atom.items() if v is not None}
        spaces = {}
        if "x_f" in out:
            spaces.update({"2d": out["h_2d"], "fused": out["embedding"]})
            spaces.update({f"adapter_{m}": a for m, a in out["adapted"].items()})
        if "y_f" in out:
            spaces["3d"] = out["h_3d"]
        return spaces
