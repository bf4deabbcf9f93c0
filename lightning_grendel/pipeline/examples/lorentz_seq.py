"""The package's Lorentz transformer classifier, cut into pipeline stages.

Stages exchange one tensor, so the padding mask travels with the points as one extra channel
(``(B, L, d+1)``, 1.0 where padded) and every stage splits it off again; the manifold points stay
untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_grendel.hyperbolic import math as lm
from lightning_grendel.hyperbolic.data.sequences import PAD
from lightning_grendel.hyperbolic.modules.transformer import LorentzTransformerModule
from lightning_grendel.hyperbolic.nets.seq import LorentzSequenceClassifier
from lightning_grendel.pipeline.stages import Pipeline, PipelineStage


class _Front(nn.Module):
    """Tokens -> points, then the first encoder layers; emits points with the mask channel appended."""

    def __init__(self, model: LorentzSequenceClassifier, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed, self.position, self.layers = model.embed, model.position, nn.ModuleList(layers)

    def forward(self, tokens: Tensor) -> Tensor:
        padding = tokens == PAD
        h = self.position(self.embed(tokens))
        for layer in self.layers:
            h = layer(h, padding)
        return torch.cat([h, padding.to(h.dtype).unsqueeze(-1)], dim=-1)


class _Middle(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        h, padding = x[..., :-1], x[..., -1] > 0.5
        for layer in self.layers:
            h = layer(h, padding)
        return torch.cat([h, x[..., -1:]], dim=-1)


class _Back(nn.Module):
    """Last encoder layers, centroid over non-padding positions, distance classifier."""

    def __init__(self, model: LorentzSequenceClassifier, layers: list[nn.Module]) -> None:
        super().__init__()
        self.manifold, self.classifier, self.layers = model.manifold, model.classifier, nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        h, padding = x[..., :-1], x[..., -1] > 0.5
        for layer in self.layers:
            h = layer(h, padding)
        weights = (~padding).to(h.dtype).unsqueeze(1)
        return self.classifier(lm.centroid(h, self.manifold.k.to(h), weights).squeeze(1))


class PipelinedLorentzClassifier(LorentzTransformerModule):
    """``LorentzTransformerModule(task="classify")`` plus the stage hook; ``stage_splits`` are layer indices.

    Args:
        stage_splits: encoder layer indices where a new pipeline stage starts (embedding joins the first
            stage, the classifier the last); at least one is needed under ``PipelineStrategy``.
        stage_input_specs: each stage's input layout on its mesh (``"R"`` replicated, ``"S0"``/``"S1"``: batch
            rows over that mesh axis); one per stage, default all ``"R"``.
    """

    def __init__(self, stage_splits: list[int] | None = None, stage_input_specs: list[str] | None = None,
                 vocab_size: int | None = None, num_classes: int | None = None, max_len: int | None = None,
                 d_model: int = 16, heads: int = 2, num_layers: int = 2, d_ff: int = 32, dropout: float = 0.0,
                 k: float = 1.0, label_smoothing: float = 0.0, lr: float = 0.005) -> None:
        super().__init__(task="classify", d_model=d_model, heads=heads, num_layers=num_layers, d_ff=d_ff,
                         dropout=dropout, k=k, label_smoothing=label_smoothing, lr=lr)
        self.hparams["task"] = "classify"  # hparams are collected from this class's own arguments
        if vocab_size is not None and num_classes is not None and max_len is not None:
            self._build(vocab_size, num_classes, max_len)
        self.stage_splits = list(stage_splits or [])
        self.stage_input_specs = stage_input_specs

    def pipeline_stages(self) -> Pipeline:
        layers = list(self.model.encoder.layers)
        bounds = [0, *self.stage_splits, len(layers)]
        if bounds != sorted(bounds) or len(bounds) < 3:
            raise ValueError(f"stage_splits {self.stage_splits} must be increasing layer indices in 0..{len(layers)}")
        groups = [layers[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        modules = [_Front(self.model, groups[0]), *(_Middle(g) for g in groups[1:-1]), _Back(self.model, groups[-1])]
        specs = self.stage_input_specs or ["R"] * len(modules)
        if len(specs) != len(modules):
            raise ValueError(f"{len(specs)} stage_input_specs for {len(modules)} stages")
        smoothing = self.hparams.label_smoothing
        return Pipeline([PipelineStage(m, s) for m, s in zip(modules, specs, strict=True)],
                        lambda logits, target: F.cross_entropy(logits, target, label_smoothing=smoothing))
