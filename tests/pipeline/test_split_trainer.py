"""Trainer level: models nobody here wrote, pipelined by ``split_points`` alone, train and evaluate like plain ones.

Lightning's demo ``LightningTransformer`` (encoder-decoder, flattened ``[B*T, V]`` output, its own
``training_step`` as the loss) on 2 and 3 stages, and a GPT-2 from a small ``transformers`` config
whose token embedding is tied to its output head across the two stages (its checkpoint holds the
tied weight's optimiser state once, and a resumed rank keeps its own stage's). The Trainers run inside the
gloo ranks of one test (the process group exists, so Lightning starts no processes), so fit, validate
and predict share the processes.

Training is compared step by step: before each optimiser step every rank gathers the current weights
and the plain model computes the same batch's loss and gradients from them. Comparing end weights
instead would compare float rounding amplified by training: with the demo's SGD at lr 0.1, one
process cutting each batch into the same micro-batches drifts from the uncut run by the same amount
as the pipeline does (the pipeline equals that single-process micro-batched run).
Dropout is off (``p=0``, also inside ``MultiheadAttention``): micro-batches draw other random masks
than whole batches, as with torch pipelining.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.demos import LightningTransformer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_grendel.pipeline import PipelineStrategy
from lightning_grendel.pipeline.runtime import PipelineStepError
from tests.helpers.distributed import run_distributed

VOCAB, LENGTH = 24, 6
CLIP = 0.1  # below the GPT-2's gradient norms: the global-norm clip scales every step
DEMO_SPLITS = ["model.transformer.encoder", "model.transformer.decoder.layers.1"]


def _no_dropout(module: nn.Module) -> None:
    for child in module.modules():
        if isinstance(child, nn.Dropout):
            child.p = 0.0
        if isinstance(child, nn.MultiheadAttention):
            child.dropout = 0.0


class _Demo(LightningTransformer):
    """The demo model unchanged (no WikiText download), plus evaluation steps for the eval checks."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(vocab_size=VOCAB)
        _no_dropout(self)

    def prepare_data(self) -> None:
        pass

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        output = self(inputs, target)
        self.log("val_loss", F.nll_loss(output, target.view(-1)))
        self.log("val_worst", F.nll_loss(output, target.view(-1), reduction="none").max(), reduce_fx="max")

    def predict_step(self, batch, batch_idx):
        return self(*batch).exp()


class _DemoL2(_Demo):
    """An extra loss term over every weight: it reaches parameters the last stage does not hold."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 1e-4 * sum(p.square().sum() for p in self.parameters())


class _DemoTwice(_Demo):
    """Two forward calls in one step: the pipeline computes one forward per micro-batch."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.0 * self(*batch).sum()


class _DemoRaises(_Demo):
    """Raises after forward: only the last stage gets there (the other ranks stop the step at forward)."""

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        raise KeyError("a key the step cannot find")


class _GPT2(LightningModule):
    def __init__(self) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        super().__init__()
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
        self.model = GPT2LMHeadModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        ids, _ = batch
        loss = F.cross_entropy(self(ids)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader(count: int, batch_size: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (count, LENGTH), generator=generator)
    target = torch.randint(0, VOCAB, (count, LENGTH), generator=generator)
    return DataLoader(TensorDataset(tokens, target), batch_size=batch_size)


class _StepByStep(Callback):
    """Per step: the plain model's loss and gradients from the pipelined run's current weights.

    With ``bf16`` the plain model runs its step under autocast, as Lightning's ``bf16-mixed`` does, on
    the same ``micro`` micro-batches, each in its own autocast region with its own backward (bf16 rounds
    each matmul's result, so a row's value depends on the batch it was computed in, and one region
    would sum the micro-batches' gradients of a weight's cached bf16 copy in bf16; Lightning's plain
    run at that granularity is ``accumulate_grad_batches``).
    With ``clip`` the gradients are compared after clipping too (the optimiser's step post-hook sees
    them), against ``torch.nn.utils.clip_grad_norm_`` on the whole plain model.
    """

    def __init__(self, reference: LightningModule, bf16: bool = False, micro: int = 1,
                 clip: float | None = None) -> None:
        self.reference, self.loss_errors, self.grad_errors, self.checked = reference, [], [], set()
        self.bf16, self.micro, self.clip, self.clipped_errors, self.norms = bf16, micro, clip, [], []
        self.hook, self.released = None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch, self.module = batch, pl_module

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.released.append({name for name, p in pl_module.named_parameters() if p.numel() == 0})
        trainer.strategy.sync_parameters()  # collective: every rank gets every stage's current weights
        self.reference.load_state_dict(pl_module.state_dict())
        self.reference.zero_grad()
        self.reference.__dict__["log"] = lambda *args, **kwargs: None
        self.want = 0.0
        for piece in zip(*(part.tensor_split(self.micro) for part in self.batch), strict=True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):  # one region per micro-batch
                loss = self.reference.training_step(piece, 0) * (len(piece[0]) / len(self.batch[0]))
            loss.backward()
            self.want += loss.item()
        self.grad_errors.append(self._compare(pl_module))
        if self.clip is not None:
            self.norms.append(float(torch.nn.utils.clip_grad_norm_(self.reference.parameters(), self.clip)))
            if self.hook is None:
                self.hook = optimizer.register_step_post_hook(self._after_clipping)

    def _after_clipping(self, *args) -> None:
        self.clipped_errors.append(self._compare(self.module))

    def _compare(self, pl_module: LightningModule) -> float:
        """The largest gradient difference relative to the largest entry, over the parameters this rank holds."""
        want = dict(self.reference.named_parameters())
        worst = 0.0
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                scale = float(want[name].grad.abs().max()) or 1.0
                worst = max(worst, float((p.grad - want[name].grad).abs().max()) / scale)
                self.checked.add(name)
        return worst

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss_errors.append(abs(float(outputs["loss"]) - self.want) / abs(self.want))


def _trainer(world: int, splits: list[str], callbacks: list, **kwargs) -> Trainer:
    strategy = PipelineStrategy(split_points=splits, num_microbatches=2, timeout_s=60)
    return Trainer(accelerator="cpu", devices=world, strategy=strategy, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                   callbacks=callbacks, **kwargs)


def _fit(rank: int, world: int, model: LightningModule, reference: LightningModule, splits: list[str],
         steps: int, bf16: bool = False, clip: float | None = None) -> tuple[dict, Trainer]:
    recorder = _StepByStep(reference, bf16, 2 if bf16 else 1, clip)  # the strategy's 2 micro-batches
    trainer = _trainer(world, splits, [recorder], max_steps=steps, num_sanity_val_steps=0,
                       precision="bf16-mixed" if bf16 else "32-true", gradient_clip_val=clip)
    trainer.fit(model, _loader(8 * steps, 8, seed=1))
    names = {name for name, _ in model.named_parameters()}
    return {"loss": recorder.loss_errors, "grad": recorder.grad_errors, "checked": recorder.checked,
            "names": names, "train_loss": float(trainer.callback_metrics.get("train_loss", torch.nan)),
            "clipped": recorder.clipped_errors, "norms": recorder.norms, "released": recorder.released,
            "whole_after_fit": all(p.numel() > 0 for p in model.parameters())}, trainer


def _in_process(rank: int, world: int) -> None:
    """Lightning sees an existing process group and this rank's place in it: it starts no processes."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), OMP_NUM_THREADS="1")


def _gpt2_checkpoint(rank: int, world: int, trainer: Trainer, folder: str) -> dict:
    """The tied weight is one entry of the saved optimiser state; a resumed rank keeps its own stage's entries."""
    path = os.path.join(folder, "gpt2.ckpt")
    trainer.save_checkpoint(path)  # collective
    saved = torch.load(path, weights_only=True)
    resumed = _trainer(world, ["model.transformer.h.1"], [], max_steps=4)
    resumed.fit(_GPT2(), _loader(32, 8, seed=1), ckpt_path=path, weights_only=True)
    optimizer = resumed.optimizers[0]
    mine = {id(p) for p in resumed.strategy._pipeline.stages[rank].module.parameters()}  # stage r on rank r
    tied = resumed.lightning_module.model.lm_head.weight
    return {"entries": len(saved["optimizer_states"][0]["state"]), "unique": len(list(_GPT2().parameters())),
            "local": all(id(p) in mine for p in optimizer.state), "tied": optimizer.state[tied]["momentum_buffer"]}


def _demo_two_stages_and_gpt2(rank: int, world: int, folder: str) -> dict:
    _in_process(rank, world)
    results, _ = _fit(rank, world, _Demo(), _Demo(), DEMO_SPLITS[:1], steps=5)
    model = _Demo()
    trainer = _trainer(world, DEMO_SPLITS[:1], [])
    metrics = trainer.validate(model, _loader(10, 4, seed=2), verbose=False)[0]  # batches of 4, 4, 2 samples
    predictions = trainer.predict(model, _loader(10, 4, seed=2))
    results.update(metrics=metrics, predictions=predictions)
    if importlib.util.find_spec("transformers") is not None:
        results["gpt2"], trainer = _fit(rank, world, _GPT2(), _GPT2(), ["model.transformer.h.1"], steps=3)
        results["gpt2_checkpoint"] = _gpt2_checkpoint(rank, world, trainer, folder)
        results["gpt2_bf16_clip"] = _fit(rank, world, _GPT2(), _GPT2(), ["model.transformer.h.1"], steps=3,
                                         bf16=True, clip=CLIP)[0]
        results["gpt2_clip"] = _fit(rank, world, _GPT2(), _GPT2(), ["model.transformer.h.1"], steps=3, clip=CLIP)[0]
    return results


def _demo_three_stages(rank: int, world: int) -> dict:
    _in_process(rank, world)
    results = _fit(rank, world, _Demo(), _Demo(), DEMO_SPLITS, steps=5)[0]
    with pytest.raises(ValueError, match="depends on parameters that are not in the pipeline's last stage"):
        _trainer(world, DEMO_SPLITS, [], max_steps=1).fit(_DemoL2(), _loader(8, 8, seed=1))  # on every rank
    with pytest.raises(ValueError, match="called forward 2 times"):
        _trainer(world, DEMO_SPLITS, [], max_steps=1).fit(_DemoTwice(), _loader(8, 8, seed=1))
    with pytest.raises(PipelineStepError, match=r"failed on rank 2 \(stage 2, forward of micro-batch 0\): "
                                                "KeyError: 'a key the step cannot find'"):  # on every rank
        _trainer(world, DEMO_SPLITS, [], max_steps=1).fit(_DemoRaises(), _loader(8, 8, seed=1))
    return results


def _assert_trained_like_plain(results: list[dict], steps: int, clipped: bool = False) -> None:
    for rank, result in enumerate(results):
        assert len(result["loss"]) == steps and max(result["loss"]) < 1e-5, (rank, result["loss"])
        assert max(result["grad"]) < 1e-5, (rank, result["grad"])
        if clipped:  # the gradients the optimiser stepped with, after a clip that did scale them
            assert len(result["clipped"]) == steps and max(result["clipped"]) < 1e-5, (rank, result["clipped"])
            assert min(result["norms"]) > 2 * CLIP, result["norms"]
    assert set().union(*(r["checked"] for r in results)) == results[0]["names"]  # every parameter, on some rank
    for result in results:  # during the steps a rank holds its stage's weights only; after fit, all of them
        assert result["released"] and all(r == result["names"] - result["checked"] for r in result["released"])
        assert result["whole_after_fit"]


def _plain_evaluation() -> tuple[float, float, list[torch.Tensor]]:
    model = _Demo().eval()
    total, worst, predictions = 0.0, 0.0, []
    with torch.no_grad():
        for inputs, target in _loader(10, 4, seed=2):
            output = model(inputs, target)
            total += F.nll_loss(output, target.view(-1)).item() * len(inputs)
            worst = max(worst, F.nll_loss(output, target.view(-1), reduction="none").max().item())
            predictions.append(output.exp())
    return total / 10, worst, predictions


@pytest.mark.timeout(600)
def test_demo_transformer_and_gpt2_split_automatically_train_and_evaluate_like_the_plain_model(tmp_path):
    results = run_distributed(_demo_two_stages_and_gpt2, 2, str(tmp_path), timeout_s=240)
    _assert_trained_like_plain(results, 5)
    val_loss, val_worst, predictions = _plain_evaluation()
    for result in results:  # one value on every rank, the plain model's
        assert result["metrics"]["val_loss"] == pytest.approx(val_loss, rel=1e-5)
        assert result["metrics"]["val_worst"] == pytest.approx(val_worst, rel=1e-5)
        assert len(result["predictions"]) == len(predictions)
        for got, want in zip(result["predictions"], predictions, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if importlib.util.find_spec("transformers") is not None:
        gpt2 = [result["gpt2"] for result in results]
        _assert_trained_like_plain(gpt2, 3)
        assert gpt2[0]["train_loss"] == gpt2[1]["train_loss"]  # logged once, the same on both ranks
        saved = [result["gpt2_checkpoint"] for result in results]
        assert saved[0]["entries"] == saved[0]["unique"] and all(entry["local"] for entry in saved)
        torch.testing.assert_close(saved[0]["tied"], saved[1]["tied"], rtol=0, atol=0)  # both holders
        # bf16-mixed and global-norm clipping on a split model, the tied weight summed then counted once
        for name in ("gpt2_bf16_clip", "gpt2_clip"):
            _assert_trained_like_plain([result[name] for result in results], 3, clipped=True)


@pytest.mark.timeout(600)
def test_demo_transformer_on_three_stages_and_bad_training_steps_refused_on_every_rank():
    _assert_trained_like_plain(run_distributed(_demo_three_stages, 3, timeout_s=240), 5)
