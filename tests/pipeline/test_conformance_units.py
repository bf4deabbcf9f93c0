"""The pieces behind the conformance matrix, in one process: output dtypes under autocast, who counts
which gradient in the global norm, and the norm and clipping against torch (a world of one rank)."""

from __future__ import annotations

import contextlib
import copy
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_grendel.pipeline.clipping import clip_grad_norm_, global_grad_norm
from lightning_grendel.pipeline.meta_forward import meta_forward
from lightning_grendel.pipeline.ownership import counted_parameters
from lightning_grendel.resharding.mesh import Mesh


class _FloatTail(nn.Module):
    """A bf16-able Linear, then a region with autocast off, returning a pytree."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> dict:
        hidden = self.a(x)
        with torch.autocast("cpu", enabled=False):
            out = self.b(hidden.to(self.b.weight.dtype))
        return {"hidden": hidden, "out": out, "rows": x.shape[0]}


@pytest.mark.parametrize(("autocast", "dtype"), [(False, torch.float32), (False, torch.float64),
                                                  (True, torch.float32)])
def test_meta_forward_gives_the_real_forwards_shapes_and_dtypes(autocast, dtype):
    torch.manual_seed(0)
    module = _FloatTail().to(dtype)
    meta = copy.deepcopy(module).to("meta")
    x = torch.randn(5, 4, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        real = module(x)
        inferred = meta_forward(meta, torch.empty(x.shape, dtype=dtype, device="meta"), torch.device("cpu"))
    assert inferred["rows"] == 5
    for key in ("hidden", "out"):
        assert type(inferred[key]) is torch.Tensor and inferred[key].device.type == "meta"
        assert (inferred[key].shape, inferred[key].dtype) == (real[key].shape, real[key].dtype), key
    if autocast:  # the case a plain meta forward gets wrong
        assert inferred["hidden"].dtype == torch.bfloat16 and inferred["out"].dtype == torch.float32


def test_each_parameter_is_counted_by_one_rank_only():
    """First rank of the first stage holding it; a parameter in two stages (tied) counts once."""
    torch.manual_seed(0)
    shared = nn.Linear(2, 2)
    stages = [nn.Sequential(nn.Linear(2, 2), shared), nn.Sequential(nn.Linear(2, 2)), nn.Sequential(shared)]
    meshes = [Mesh([3, 1], (1, 2)), Mesh([0, 2], (2, 1)), Mesh([4], (1, 1))]
    params = [p for stage in stages for p in stage.parameters()]
    params = list({id(p): p for p in params}.values())
    counts = {r: counted_parameters(params, stages, meshes, r) for r in range(5)}
    assert [len(counts[r]) for r in range(5)] == [2, 0, 0, 4, 0]
    assert sorted(id(p) for c in counts.values() for p in c) == sorted(id(p) for p in params)


@pytest.fixture
def one_rank(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def _grads(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    torch.manual_seed(1)
    params = [nn.Parameter(torch.randn(3, 4, dtype=dtype)), nn.Parameter(torch.randn(5, dtype=dtype)),
              nn.Parameter(torch.randn(2, 2, dtype=dtype))]
    for p in params[:2]:
        p.grad = torch.randn_like(p) * 3
    return params  # the last one has no gradient, as a parameter of another stage


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5])
def test_norm_and_clipping_equal_torch(one_rank, norm_type, dtype):
    """Also the total's dtype, in which torch computes the clip factor (bf16 gradients: a bf16 factor)."""
    params, reference = _grads(dtype), _grads(dtype)
    want = torch.nn.utils.clip_grad_norm_(reference, max_norm=1.0, norm_type=norm_type)
    got = clip_grad_norm_(params, params, max_norm=1.0, norm_type=norm_type)
    torch.testing.assert_close(got, want)
    for mine, theirs in zip(params[:2], reference[:2], strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad)
    torch.testing.assert_close(global_grad_norm(params[2:], norm_type), torch.tensor(0.0))  # holds none


@pytest.mark.timeout(60)
def test_bad_norms_are_refused(one_rank):
    params = _grads()
    with pytest.raises(ValueError, match="norm_type 0"):
        global_grad_norm(params, 0)
    params[0].grad[0, 0] = math.nan
    assert global_grad_norm(params, math.inf).isnan()  # a max over ranks may drop NaN; the norm keeps it
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, params, 1.0, error_if_nonfinite=True)
