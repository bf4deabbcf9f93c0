"""The KG lookups (C++ and PyTorch paths) against plain formulas, gradcheck, and the hash set of facts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_grendel.hyperbolic import cpp, kg_ops
from lightning_grendel.hyperbolic import math as lm
from lightning_grendel.hyperbolic.data.keyset import KeySet

needs_kernel = pytest.mark.skipif(cpp.load(cpp.KG_OPS) is None, reason="the C++ KG kernels did not build")
PATHS = [pytest.param(True, marks=needs_kernel, id="kernel"), pytest.param(False, id="reference")]


@pytest.fixture
def path(request, monkeypatch):
    if not request.param:
        monkeypatch.setattr(kg_ops.cpp, "load", lambda extension: None)
    return request.param


def _inputs(dtype, rows=30, dim=6, batch=5, n=7, relations=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, dim, generator=g, dtype=dtype, requires_grad=True)
    table = torch.randn(rows, dim, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(rows, generator=g, dtype=dtype, requires_grad=True)
    tails = torch.randint(0, rows, (batch, n), generator=g)
    tails[0, :3] = 4  # repeated rows accumulate their gradients
    weight = torch.randn(relations, dim, dim, generator=g, dtype=dtype, requires_grad=True)
    relation = torch.randint(0, relations, (batch,), generator=g)
    return h, table, bias, tails, weight, relation


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tail_scores_and_gradients_match_the_formula(path, dtype):
    h, table, bias, tails, *_ = _inputs(dtype)
    upstream = torch.randn(tails.shape, dtype=dtype)
    results = []
    for f in (kg_ops.tail_scores, lambda h, e, b, t: lm.inner(h.unsqueeze(1), e[t]) + b[t]):
        for p in (h, table, bias):
            p.grad = None
        scores = f(h, table, bias, tails)
        (scores * upstream).sum().backward()
        results.append([scores.detach(), h.grad, table.grad, bias.grad])
    for ours, formula in zip(*results, strict=True):
        torch.testing.assert_close(ours, formula)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relation_matvec_and_gradients_match_the_formula(path, dtype):
    h, _, _, _, weight, relation = _inputs(dtype)
    upstream = torch.randn(h.shape, dtype=dtype)
    results = []
    for f in (kg_ops.relation_matvec, lambda w, x, r: (w[r] @ x.unsqueeze(-1)).squeeze(-1)):
        weight.grad = h.grad = None
        z = f(weight, h, relation)
        (z * upstream).sum().backward()
        results.append([z.detach(), weight.grad, h.grad])
    for ours, formula in zip(*results, strict=True):
        torch.testing.assert_close(ours, formula)


@needs_kernel
def test_kernels_pass_gradcheck():
    h, table, bias, tails, weight, relation = _inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda *a: kg_ops.tail_scores(*a, tails), (h, table, bias))
    assert torch.autograd.gradcheck(lambda w, x: kg_ops.relation_matvec(w, x, relation), (weight, h))


@needs_kernel
def test_kernel_results_do_not_depend_on_the_thread_count():
    """Bit-identical with 1 and 2 threads (tables large enough to be split between them)."""
    h, table, bias, tails, weight, relation = _inputs(torch.float32, rows=20000, dim=32, batch=600, n=40,
                                                      relations=70)
    upstream = torch.randn(tails.shape)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for p in (h, table, bias, weight):
                p.grad = None
            (kg_ops.tail_scores(h, table, bias, tails) * upstream).sum().backward()
            kg_ops.relation_matvec(weight, h, relation).sum().backward()
            results.append([p.grad.clone() for p in (h, table, bias, weight)])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@needs_kernel
def test_an_index_out_of_range_is_an_error():
    h, table, bias, tails, weight, relation = _inputs(torch.float64)
    with pytest.raises(RuntimeError, match="tails holds an index outside"):
        kg_ops.tail_scores(h, table, bias, tails + 100)
    with pytest.raises(RuntimeError, match="relation holds an index outside"):
        kg_ops.relation_matvec(weight, h, relation - 5)


@pytest.mark.parametrize("max_load", [0.25, 0.95])
def test_keyset_membership_matches_isin(max_load):
    """At 95% load most lookups walk several slots, and the table wraps around its end."""
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 10**11, 5000)
    keys[:10] = [0, 1, 2, 3, 10**11 - 1, 7, 7, 7, 8, 9]  # duplicates and neighbours
    key_set = KeySet(keys, max_load=max_load)
    assert len(key_set) == len(np.unique(keys))
    queries = np.concatenate([rng.choice(keys, 3000), rng.integers(0, 10**11, 3000), [0, 4, 5, 6]]).reshape(-1, 2)
    np.testing.assert_array_equal(key_set.contains(queries), np.isin(queries, keys))
    assert not KeySet(np.array([], dtype=np.int64)).contains(np.arange(5)).any()
    with pytest.raises(ValueError, match="non-negative"):
        KeySet(np.array([3, -1]))
