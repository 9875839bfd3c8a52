"""Transformer blocks with a pair channel: attention biased by pair features, pair features updated
by the attention logits (Uni-Mol), pre-LN."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class SharedAttention(nn.Module):
    """Multi-head self-attention with an additive pair bias. One instance per layer is *shared* by
    the 2D and the 3D encoder: its Q, K, V and output projections are the same parameters.

    Returns the attended atoms [B, N, d] and the attention logits [B, N, N, H] (q.k/sqrt(d_h) +
    bias), which become the next layer's pair representation.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, pair: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, dh]
        bias = pair.permute(0, 3, 1, 2)  # [B, H, N, N]
        # Padding keys get -inf; the bias is cast to the activations' dtype (bf16 under autocast).
        attn_bias = bias.masked_fill(~key_mask[:, None, None, :], float("-inf")).to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0)
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5 + bias.to(q.dtype)
        return self.out(o.transpose(1, 2).reshape(b, n, d)), logits.permute(0, 2, 3, 1)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__(nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim))


class PairTransformerLayer(nn.Module):
    """x <- x + Attn(LN(x), pair); x <- x + FFN(LN(x)); pair <- attention logits.

    ``attention`` may be passed in to share it with another stack; layer norms and the
    feed-forward block are always this layer's own.
    """

    def __init__(self, dim: int, heads: int, ffn_mult: int = 4, dropout: float = 0.0,
                 attention: SharedAttention | None = None):
        super().__init__()
        self.ln_attn = nn.LayerNorm(dim)
        self.ln_ffn = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_mult, dropout)
        # Stored outside the module tree when shared, so that each shared tensor has one owner
        # (the model's ``shared_attention``) and the encoders' own parameters are only theirs.
        if attention is None:
            self.attention = SharedAttention(dim, heads, dropout)
            self._shared = None
        else:
            self._shared = [attention]

    @property
    def attn(self) -> SharedAttention:
        return self._shared[0] if self._shared is not None else self.attention

    def forward(self, x, pair, mask):
        h, pair = self.attn(self.ln_attn(x), pair, mask)
        return self.feed_forward(x + h), pair

    def feed_forward(self, x):
        return x + self.ffn(self.ln_ffn(x))


def shared_layer_pair(l2: PairTransformerLayer, l3: PairTransformerLayer, x, p, y, q, mask):
    """One layer of two encoders whose attention is shared, as a single attention call over the
    2D and 3D sequences stacked along the batch: the same result as running ``l2`` and ``l3``
    one after the other, with half the attention launches (what a GPU's latency follows)."""
    assert l2.attn is l3.attn, "the layers do not share their attention"
    h, pair = l2.attn(torch.cat([l2.ln_attn(x), l3.ln_attn(y)]), torch.cat([p, q]), torch.cat([mask, mask]))
    hx, hy = h.chunk(2)
    p, q = pair.chunk(2)
    return l2.feed_forward(x + hx), p, l3.feed_forward(y + hy), q


class PairTransformer(nn.Module):
    """A stack of :class:`PairTransformerLayer` with a final layer norm on atoms and pairs."""

    def __init__(self, dim: int, heads: int, layers: int, ffn_mult: int = 4, dropout: float = 0.0,
                 attentions: nn.ModuleList | None = None):
        super().__init__()
        self.layers = nn.ModuleList(
            PairTransformerLayer(dim, heads, ffn_mult, dropout, attentions[i] if attentions is not None else None)
            for i in range(layers)
        )
        self.ln_out = nn.LayerNorm(dim)
        self.ln_pair = nn.LayerNorm(heads)

    def forward(self, x, pair, mask):
        for layer in self.layers:
            x, pair = layer(x, pair, mask)
        return self.finish(x, pair)

    def finish(self, x, pair):
        return self.ln_out(x), self.ln_pair(pair)


def encode_jointly(enc2: PairTransformer, enc3: PairTransformer, x, p, y, q, mask):
    """Both encoders over paired inputs, layer by layer with :func:`shared_layer_pair`."""
    for l2, l3 in zip(enc2.layers, enc3.layers):
        x, p, y, q = shared_layer_pair(l2, l3, x, p, y, q, mask)
    return (*enc2.finish(x, p), *enc3.finish(y, q))


def attention_probabilities(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The attention probabilities [B, N, N] (query i, key j) of a layer whose attention returned
    ``logits`` [B, N, N, H]: the softmax over the real keys (``mask`` [B, N]) that the attention
    applied, averaged over the heads. Every row, padding queries' too, sums to 1 over real atoms."""
    keys = mask[:, None, :, None]
    probs = torch.softmax(logits.float().masked_fill(~keys, float("-inf")), dim=2)
    return probs.mean(-1)


@contextmanager
def capture_attention(*stacks: PairTransformer, detach: bool = True) -> Iterator[list[torch.Tensor]]:
    """Record the attention probabilities of every layer of ``stacks`` while the block runs.

    Yields a list that receives, per layer call in call order, the layer's
    :func:`attention_probabilities` [B, N, N] (averaged over heads). Recording reads the logits
    and the mask a layer already returns and takes, so the outputs are unchanged; ``detach=False``
    keeps the probabilities in the autograd graph. Layers run one at a time through their own
    ``forward`` are recorded; :func:`shared_layer_pair` (paired inputs through two stacks at
    once) calls the attention directly and is not.
    """
    records: list[torch.Tensor] = []

    def hook(layer, args, kwargs, output):
        mask = args[2] if len(args) > 2 else kwargs["mask"]
        probs = attention_probabilities(output[1], mask)
        records.append(probs.detach() if detach else probs)

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for stack in stacks for layer in stack.layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
