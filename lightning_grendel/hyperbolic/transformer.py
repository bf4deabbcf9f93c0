"""Lorentz transformer blocks: residual, feed-forward, positional input, encoder and decoder stacks.

There is no LayerNorm: every block ends in a :class:`LorentzLinear`, whose bounded time keeps
activations at a controlled distance from the origin.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_grendel.hyperbolic.attention import LorentzMultiheadAttention
from lightning_grendel.hyperbolic.linear import LorentzLinear
from lightning_grendel.hyperbolic.manifold import LorentzManifold


class LorentzResidual(nn.Module):
    """Merges concatenated heads (or any point block) with the previous point added as bias point."""

    def __init__(self, manifold: LorentzManifold, d_in: int, d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = LorentzLinear(manifold, d_in, d_model, dropout=dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.linear(x, bias_point=residual)


class LorentzFeedForward(nn.Module):
    """``LorentzLinear(d, d_ff)`` then ``LorentzLinear(d_ff, d, nonlin=ReLU)`` with the input as residual."""

    def __init__(self, manifold: LorentzManifold, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.up = LorentzLinear(manifold, d_model, d_ff, dropout=dropout)
        self.down = LorentzLinear(manifold, d_ff, d_model, dropout=dropout, nonlin=torch.relu)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.up(x), bias_point=x)


class LorentzPositional(nn.Module):
    """Adds a learned Euclidean positional vector as bias point through a LorentzLinear."""

    def __init__(self, manifold: LorentzManifold, d_model: int, max_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.position = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.position.weight, std=0.02)
        self.linear = LorentzLinear(manifold, d_model, d_model, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        positions = torch.arange(x.shape[-2], device=x.device)
        return self.linear(x, bias_point=self.position(positions))


def causal_mask(length: int, device: torch.device | None = None) -> Tensor:
    """Boolean ``(L, L)`` mask, True above the diagonal (future positions may not be attended)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class LorentzEncoderLayer(nn.Module):
    def __init__(self, manifold: LorentzManifold, d_model: int, heads: int, d_ff: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = LorentzMultiheadAttention(manifold, d_model, heads, dropout)
        self.residual = LorentzResidual(manifold, d_model, d_model, dropout)
        self.ff = LorentzFeedForward(manifold, d_model, d_ff, dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = self.residual(self.attn(x, x, x, key_padding_mask=key_padding_mask), x)
        return self.ff(x)


class LorentzDecoderLayer(nn.Module):
    def __init__(self, manifold: LorentzManifold, d_model: int, heads: int, d_ff: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = LorentzMultiheadAttention(manifold, d_model, heads, dropout)
        self.self_residual = LorentzResidual(manifold, d_model, d_model, dropout)
        self.cross_attn = LorentzMultiheadAttention(manifold, d_model, heads, dropout)
        self.cross_residual = LorentzResidual(manifold, d_model, d_model, dropout)
        self.ff = LorentzFeedForward(manifold, d_model, d_ff, dropout)

    def forward(self, x: Tensor, memory: Tensor, memory_padding_mask: Tensor | None = None,
                tgt_padding_mask: Tensor | None = None) -> Tensor:
        mask = causal_mask(x.shape[-2], x.device)
        x = self.self_residual(self.self_attn(x, x, x, key_padding_mask=tgt_padding_mask, attn_mask=mask), x)
        x = self.cross_residual(self.cross_attn(x, memory, memory, key_padding_mask=memory_padding_mask), x)
        return self.ff(x)


class LorentzTransformerEncoder(nn.Module):
    """A stack of :class:`LorentzEncoderLayer`; input and output are ``(B, L, d_model)`` points."""

    def __init__(self, manifold: LorentzManifold, num_layers: int, d_model: int, heads: int, d_ff: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            LorentzEncoderLayer(manifold, d_model, heads, d_ff, dropout) for _ in range(num_layers)
        )

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return x


class LorentzTransformerDecoder(nn.Module):
    """A stack of causal :class:`LorentzDecoderLayer` attending to an encoder's memory."""

    def __init__(self, manifold: LorentzManifold, num_layers: int, d_model: int, heads: int, d_ff: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            LorentzDecoderLayer(manifold, d_model, heads, d_ff, dropout) for _ in range(num_layers)
        )

    def forward(self, x: Tensor, memory: Tensor, memory_padding_mask: Tensor | None = None,
                tgt_padding_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, memory, memory_padding_mask, tgt_padding_mask)
        return x
