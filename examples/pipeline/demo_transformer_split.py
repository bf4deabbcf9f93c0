"""Lightning's own demo transformer, unmodified, pipelined over 3 processes: only the strategy argument is new.

torch's tracer cuts the model before the encoder and before the second decoder layer; the model's own
``training_step`` is the loss. Dropout is switched off so the run is comparable with a plain one
(micro-batches draw other dropout masks than whole batches), and the data are random tokens, so
nothing is downloaded.

Run: python examples/pipeline/demo_transformer_split.py   (3 gloo processes on CPU)
"""

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos import LightningTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_grendel.pipeline import PipelineStrategy


class RandomTokens(LightningTransformer):
    """The demo model; only WikiText's download is skipped (the data below are random tokens)."""

    def prepare_data(self) -> None:
        pass


if __name__ == "__main__":
    torch.manual_seed(0)
    model = RandomTokens(vocab_size=100)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
    tokens = torch.randint(0, 100, (256, 16))
    data = DataLoader(TensorDataset(tokens, tokens.roll(-1, dims=1)), batch_size=16)
    strategy = PipelineStrategy(split_points=["model.transformer.encoder", "model.transformer.decoder.layers.1"],
                                num_microbatches=4)
    trainer = Trainer(accelerator="cpu", devices=3, strategy=strategy, max_epochs=1, logger=False,
                      enable_checkpointing=False)
    trainer.fit(model, data)
