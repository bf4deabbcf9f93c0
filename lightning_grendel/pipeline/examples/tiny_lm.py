"""Small character language models (causal transformer; tensor-parallel MLP) and a generated corpus, for recipes.

Both are ordinary LightningModules (they train unpipelined with any strategy); their
``pipeline_stages`` hooks say how the recipes cut them into stages.
"""

from __future__ import annotations

import random

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_grendel.pipeline.stages import Pipeline, PipelineStage

_WORDS = ("the", "cat", "dog", "sat", "ran", "on", "under", "a", "mat", "tree", "red", "small", "and", "then")


def generated_text(num_sentences: int = 2000, seed: int = 0) -> str:
    """Sentences from a tiny seeded grammar: enough structure for a loss that visibly falls."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS[:2]), rng.choice(_WORDS[3:5]), rng.choice(_WORDS[5:7]), "a",
                 rng.choice(_WORDS[10:12]), rng.choice(_WORDS[8:10])]
        sentences.append(" ".join(words) + ".")
    return " ".join(sentences)


class _Windows(Dataset):
    def __init__(self, tokens: torch.Tensor, seq_len: int, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(tokens) - seq_len - 1, (count,), generator=generator)
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[index])
        window = self.tokens[start:start + self.seq_len + 1]
        return window[:-1], window[1:]


class CharTextDataModule(LightningDataModule):
    """Next-character prediction on :func:`generated_text`; ``vocab_size`` is fixed at 64 (byte values folded).

    Args:
        seq_len: characters per input window (the target is the same window shifted by one).
        batch_size: windows per batch (the last incomplete batch is dropped).
        num_windows: training windows per epoch, at random start positions in the corpus.
        seed: seed of the generated corpus and of the window positions.
    """

    vocab_size = 64

    def __init__(self, seq_len: int = 32, batch_size: int = 16, num_windows: int = 512, seed: int = 0) -> None:
        super().__init__()
        self.seq_len, self.batch_size, self.num_windows, self.seed = seq_len, batch_size, num_windows, seed

    def setup(self, stage: str | None = None) -> None:
        tokens = torch.tensor([ord(c) % self.vocab_size for c in generated_text(seed=self.seed)])
        self.train_set = _Windows(tokens, self.seq_len, self.num_windows, self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, drop_last=True)


class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal self-attention."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class _Embed(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, seq_len: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab_size, d_model), nn.Embedding(seq_len, d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))


class _Head(nn.Module):
    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.norm, self.out = nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position (a mean over the batch dim, as the pipeline requires)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


class _CharLM(LightningModule):
    """Training step and optimiser shared by the demo LMs (used when they run unpipelined)."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, target = batch
        loss = lm_loss(self(ids), target)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class TinyTransformerLM(_CharLM):
    """Character-level causal LM. ``stage_splits`` are block indices where a new stage starts.

    Args:
        vocab_size: token ids (64 for :class:`CharTextDataModule`).
        d_model: embedding width of every block.
        n_heads: attention heads per block (must divide ``d_model``).
        n_layers: transformer blocks.
        seq_len: longest input in tokens (size of the learned position table).
        lr: Adam learning rate.
        stage_splits: block indices where a new pipeline stage starts (embedding joins the first stage, the
            head the last); none: one stage.
        stage_input_specs: each stage's input layout on its mesh (``"R"`` replicated, ``"S0"``/``"S1"``: batch
            rows over that mesh axis); one per stage, default all ``"R"``.
    """

    def __init__(self, vocab_size: int = 64, d_model: int = 32, n_heads: int = 4, n_layers: int = 4,
                 seq_len: int = 32, lr: float = 3e-3, stage_splits: list[int] | None = None,
                 stage_input_specs: list[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = _Embed(vocab_size, d_model, seq_len)
        self.blocks = nn.ModuleList(CausalBlock(d_model, n_heads) for _ in range(n_layers))
        self.head = _Head(d_model, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def pipeline_stages(self) -> Pipeline:
        """Embedding joins the first stage, the head the last; blocks are cut at ``stage_splits``."""
        splits = list(self.hparams.stage_splits or [])
        bounds = [0, *splits, len(self.blocks)]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError(f"stage_splits {splits} must be increasing block indices inside 1..{len(self.blocks) - 1}")
        modules = []
        for i in range(len(bounds) - 1):
            parts = [self.embed] if i == 0 else []
            parts += list(self.blocks[bounds[i]:bounds[i + 1]])
            parts += [self.head] if i == len(bounds) - 2 else []
            modules.append(nn.Sequential(*parts))
        specs = self.hparams.stage_input_specs or ["R"] * len(modules)
        if len(specs) != len(modules):
            raise ValueError(f"{len(specs)} stage_input_specs for {len(modules)} stages")
        return Pipeline([PipelineStage(m, spec) for m, spec in zip(modules, specs, strict=True)], lm_loss)


class TensorParallelMLPLM(_CharLM):
    """Character LM: embedding, a wide up-projection, GELU MLP back down, head. Two pipeline stages.

    Stage 0 (embedding + up-projection) ends in the wide Linear, which ``tensor_parallel`` makes
    column-parallel over its mesh's last axis: its output leaves sharded by features and reaches
    stage 1, on a mesh of another shape, through cross-mesh resharding.

    Args:
        vocab_size: token ids (64 for :class:`CharTextDataModule`).
        d_model: embedding width.
        hidden: width of the up-projection (the tensor-parallel Linear's output features).
        seq_len: longest input in tokens (size of the learned position table).
        lr: Adam learning rate.
        stage_input_specs: the two stages' input layouts on their meshes (``"R"`` replicated, ``"S0"``/``"S1"``:
            batch rows over that mesh axis); default ``["R", "R"]``.
        tensor_parallel: split the up-projection column-parallel over stage 0's last mesh axis.
    """

    def __init__(self, vocab_size: int = 64, d_model: int = 32, hidden: int = 128, seq_len: int = 32,
                 lr: float = 3e-3, stage_input_specs: list[str] | None = None, tensor_parallel: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = _Embed(vocab_size, d_model, seq_len)
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Sequential(nn.GELU(), nn.Linear(hidden, d_model), nn.GELU())
        self.head = _Head(d_model, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.up(self.embed(ids))))

    def pipeline_stages(self) -> Pipeline:
        """``nn.Sequential(embed, up)`` names the up-projection ``"1"``: that is the column-parallel Linear."""
        specs = self.hparams.stage_input_specs or ["R", "R"]
        if len(specs) != 2:
            raise ValueError(f"{len(specs)} stage_input_specs for 2 stages")
        front = PipelineStage(nn.Sequential(self.embed, self.up), specs[0],
                              column_parallel="1" if self.hparams.tensor_parallel else None)
        return Pipeline([front, PipelineStage(nn.Sequential(self.down, self.head), specs[1])], lm_loss)
