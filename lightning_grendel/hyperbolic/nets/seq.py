"""Lorentz transformer models: sequence classification and sequence-to-sequence (encoder-decoder)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_grendel.hyperbolic import math as lm
from lightning_grendel.hyperbolic.classifier import LorentzDistanceClassifier
from lightning_grendel.hyperbolic.embedding import LorentzEmbedding
from lightning_grendel.hyperbolic.manifold import LorentzManifold
from lightning_grendel.hyperbolic.transformer import (
    LorentzPositional,
    LorentzTransformerDecoder,
    LorentzTransformerEncoder,
)


class LorentzSequenceClassifier(nn.Module):
    """Token points + positions -> encoder -> centroid over non-padding positions -> distance classifier."""

    def __init__(self, vocab_size: int, num_classes: int, d_model: int = 16, heads: int = 2, num_layers: int = 2,
                 d_ff: int = 32, max_len: int = 64, dropout: float = 0.0, k: float = 1.0) -> None:
        super().__init__()
        self.manifold = LorentzManifold(k)
        self.embed = LorentzEmbedding(self.manifold, vocab_size, d_model)
        self.position = LorentzPositional(self.manifold, d_model, max_len, dropout)
        self.encoder = LorentzTransformerEncoder(self.manifold, num_layers, d_model, heads, d_ff, dropout)
        self.classifier = LorentzDistanceClassifier(self.manifold, d_model, num_classes)

    def forward(self, tokens: Tensor, padding_mask: Tensor) -> Tensor:
        h = self.encoder(self.position(self.embed(tokens)), key_padding_mask=padding_mask)
        weights = (~padding_mask).to(h.dtype).unsqueeze(1)  # (B, 1, L)
        pooled = lm.centroid(h, self.manifold.k.to(h), weights).squeeze(1)
        return self.classifier(pooled)


class LorentzSeq2Seq(nn.Module):
    """Encoder-decoder with shared token points; output logits are ``-d_L^2`` to the token points' copies
    in a distance classifier over the vocabulary (teacher forcing in ``forward``, greedy ``generate``)."""

    def __init__(self, vocab_size: int, d_model: int = 16, heads: int = 2, num_layers: int = 2, d_ff: int = 32,
                 max_len: int = 64, dropout: float = 0.0, k: float = 1.0) -> None:
        super().__init__()
        self.manifold = LorentzManifold(k)
        self.embed = LorentzEmbedding(self.manifold, vocab_size, d_model)
        self.src_position = LorentzPositional(self.manifold, d_model, max_len, dropout)
        self.tgt_position = LorentzPositional(self.manifold, d_model, max_len, dropout)
        self.encoder = LorentzTransformerEncoder(self.manifold, num_layers, d_model, heads, d_ff, dropout)
        self.decoder = LorentzTransformerDecoder(self.manifold, num_layers, d_model, heads, d_ff, dropout)
        self.generator = LorentzDistanceClassifier(self.manifold, d_model, vocab_size)

    def encode(self, src: Tensor, src_padding: Tensor) -> Tensor:
        return self.encoder(self.src_position(self.embed(src)), key_padding_mask=src_padding)

    def decode(self, tgt_in: Tensor, memory: Tensor, src_padding: Tensor) -> Tensor:
        h = self.decoder(self.tgt_position(self.embed(tgt_in)), memory, memory_padding_mask=src_padding)
        return self.generator(h)

    def forward(self, src: Tensor, src_padding: Tensor, tgt_in: Tensor) -> Tensor:
        return self.decode(tgt_in, self.encode(src, src_padding), src_padding)

    @torch.no_grad()
    def generate(self, src: Tensor, src_padding: Tensor, length: int, bos: int) -> Tensor:
        """Greedy decoding of ``length`` tokens after ``bos``."""
        memory = self.encode(src, src_padding)
        out = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
        for _ in range(length):
            next_token = self.decode(out, memory, src_padding)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, next_token], dim=1)
        return out[:, 1:]
