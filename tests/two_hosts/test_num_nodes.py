"""GrendelStrategy with Lightning's ``num_nodes`` across two hosts, ranks started by ``torchrun --nnodes 2``.

Lightning reads torchrun's environment (TorchElastic cluster environment): each host's ranks take the
global ranks ``node_rank * devices + local_rank``; the Gaussians are sharded over all four ranks and
two training steps run with the exchange crossing the veth link.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_grendel._two_hosts import TwoHosts
from lightning_grendel.splatting.data.datamodule import GaussianSplattingDataModule
from lightning_grendel.splatting.grendel import GrendelStrategy
from lightning_grendel.splatting.module import GaussianSplattingModule


class _Gather(Callback):
    """At the end of training (process group still up): this rank's shard and, on rank 0, every shard."""

    def on_train_end(self, trainer, module) -> None:
        self.local = module.gaussians["means"].detach().clone()
        self.gathered = module.gathered_gaussians()  # collective over both hosts


def _fit_rank(rank: int, world: int) -> dict:
    module = GaussianSplattingModule(sh_degree=0, export_ply=False, backend="torch")
    data = GaussianSplattingDataModule(format="demo", image_width=64, batch_size=2, num_init_points=200)
    trainer = Trainer(strategy=GrendelStrategy(timeout_s=60), accelerator="cpu", devices=2, num_nodes=2,
                      max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[gather := _Gather()])
    trainer.fit(module, datamodule=data)
    return {"global_rank": trainer.global_rank, "world_size": trainer.world_size, "node_rank": trainer.node_rank,
            "env": type(trainer.strategy.cluster_environment).__name__, "host": socket.gethostname(),
            "local": gather.local, "all": gather.gathered["means"] if gather.gathered is not None else None,
            "rank_env": int(os.environ["RANK"]), "steps": trainer.global_step}


@pytest.mark.timeout(240)
def test_grendel_strategy_num_nodes_two_across_hosts(two_hosts: TwoHosts):
    ranks = two_hosts.run("tests.two_hosts.test_num_nodes:_fit_rank", (2, 2), timeout_s=150)
    assert [r["global_rank"] for r in ranks] == [r["rank_env"] for r in ranks] == [0, 1, 2, 3]
    assert [r["node_rank"] for r in ranks] == [0, 0, 1, 1]
    assert [r["host"] for r in ranks] == [two_hosts.hostnames[0]] * 2 + [two_hosts.hostnames[1]] * 2
    assert all(r["world_size"] == 4 and r["steps"] == 2 for r in ranks)
    assert all(r["env"] == "TorchElasticEnvironment" for r in ranks)
    assert all(r["local"].shape[0] > 0 for r in ranks)  # every rank of both hosts holds a shard
    # Rank 0 gathers exactly the four shards of both hosts, in rank order.
    torch.testing.assert_close(ranks[0]["all"], torch.cat([r["local"] for r in ranks]), rtol=0, atol=0)
