"""The project of classifier.py run as a 3-stage pipeline: only the stage hook and the strategy changed.

Run: python examples/pipeline/classifier_pipelined.py   (3 gloo processes on CPU)
"""

import math

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_grendel  # noqa: F401  (registers strategy="pipeline")
from lightning_grendel.pipeline import Pipeline, PipelineStage


class SpiralData(LightningDataModule):
    def __init__(self, num_points: int = 1536, batch_size: int = 64):
        super().__init__()
        self.num_points, self.batch_size = num_points, batch_size

    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 3, (self.num_points,), generator=generator)
        radius = torch.rand(self.num_points, generator=generator)
        angle = labels * 2 * math.pi / 3 + radius * 4 + 0.2 * torch.randn(self.num_points, generator=generator)
        points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
        self.train_set = TensorDataset(points, labels)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)


class SpiralClassifier(LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.body = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.classifier = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.classifier(self.body(self.encoder(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def pipeline_stages(self):  # no loss given: training_step above is the loss, run on the last stage
        return Pipeline([PipelineStage(self.encoder), PipelineStage(self.body), PipelineStage(self.classifier)])


if __name__ == "__main__":
    torch.manual_seed(0)
    trainer = Trainer(accelerator="cpu", devices=3, strategy="pipeline", max_epochs=5,
                      logger=False, enable_checkpointing=False)
    trainer.fit(SpiralClassifier(), SpiralData())
