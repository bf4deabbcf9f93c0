"""Every Lorentz layer maps onto the hyperboloid, for random and extreme inputs, k in {0.5, 1, 2}."""

from __future__ import annotations

import pytest
import torch

from lightning_grendel.hyperbolic import math as lm
from lightning_grendel.hyperbolic.attention import LorentzMultiheadAttention
from lightning_grendel.hyperbolic.classifier import LorentzDistanceClassifier
from lightning_grendel.hyperbolic.embedding import LorentzEmbedding
from lightning_grendel.hyperbolic.linear import LorentzLinear
from lightning_grendel.hyperbolic.manifold import LorentzManifold
from lightning_grendel.hyperbolic.transformer import (
    LorentzFeedForward,
    LorentzPositional,
    LorentzTransformerDecoder,
    LorentzTransformerEncoder,
)
from tests.helpers.hyperbolic import DTYPES, KS, assert_on_hyperboloid, random_points


def inputs(k: float, dtype: torch.dtype, shape=(2, 5), dim: int = 8) -> list[torch.Tensor]:
    """Near-origin, ordinary and far-away (x0 ~ 1e4) points, plus the origin itself."""
    n = shape[0] * shape[1]
    pts = [random_points(n, dim, k, dtype, spread=s, seed=i) for i, s in enumerate((1e-3, 1.0, 1e4))]
    pts.append(lm.origin((n, dim), k, dtype=dtype))
    return [p.reshape(*shape, dim) for p in pts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_lorentz_linear(k, dtype):
    torch.manual_seed(0)
    m = LorentzManifold(k)
    for layer in (LorentzLinear(m, 8, 6), LorentzLinear(m, 8, 12, heads=3, nonlin=torch.relu, dropout=0.3),
                  LorentzLinear(m, 8, 8, bias=False)):
        layer.to(dtype)
        for x in inputs(k, dtype):
            assert_on_hyperboloid(layer(x), k, heads=layer.heads)
        bias_point = torch.randn(2, 5, layer.linear.out_features, dtype=dtype) * 1e6
        assert_on_hyperboloid(layer(inputs(k, dtype)[1], bias_point=bias_point), k, heads=layer.heads)
    with pytest.raises(ValueError, match="divisible"):
        LorentzLinear(m, 8, 7, heads=2)


def test_lorentz_linear_time_is_bounded_and_gradients_finite():
    m = LorentzManifold(2.0)
    layer = LorentzLinear(m, 5, 5, scale=3.0)
    x = random_points(64, 5, 2.0, torch.float32, spread=100.0).requires_grad_(True)
    y = layer(x)
    assert (y[:, 0] >= 1.1 * 2**0.5 - 1e-5).all() and (y[:, 0] <= 1.1 * 2**0.5 + 3.0 + 1e-4).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.linear.weight.grad).all()


def test_lorentz_linear_can_represent_a_boost():
    """With W = a boost matrix and a large time scale, the layer reproduces the boost's direction."""
    m = LorentzManifold(1.0)
    layer = LorentzLinear(m, 4, 4, bias=False).double()
    v = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    with torch.no_grad():
        layer.linear.weight.copy_(lm.boost_matrix(v))
    x = random_points(10, 4, 1.0, torch.float64, spread=0.5)
    expected = (lm.boost_matrix(v) @ x.unsqueeze(-1)).squeeze(-1)
    out = layer(x)
    cos = torch.nn.functional.cosine_similarity(out[:, 1:], expected[:, 1:], dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_attention_and_blocks(k, dtype):
    torch.manual_seed(0)
    m = LorentzManifold(k)
    attn = LorentzMultiheadAttention(m, 8, heads=2, dropout=0.1).to(dtype)
    ff = LorentzFeedForward(m, 8, 16).to(dtype)
    pos = LorentzPositional(m, 8, max_len=5).to(dtype)
    for x in inputs(k, dtype):
        assert_on_hyperboloid(attn(x, x, x), k, heads=2)
        assert_on_hyperboloid(ff(x), k)
        assert_on_hyperboloid(pos(x), k)


def test_attention_masks():
    torch.manual_seed(0)
    m = LorentzManifold(1.0)
    attn = LorentzMultiheadAttention(m, 8, heads=2).double().eval()
    q = inputs(1.0, torch.float64)[1]
    kv = random_points(10, 8, 1.0, torch.float64, seed=3).reshape(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[:, 3:] = True
    out = attn(q, kv, kv, key_padding_mask=pad)
    changed = kv.clone()
    changed[:, 3:] = random_points(4, 8, 1.0, torch.float64, spread=5.0, seed=4).reshape(2, 2, 8)
    torch.testing.assert_close(attn(q, changed, changed, key_padding_mask=pad), out)
    assert not torch.allclose(attn(q, changed, changed), attn(q, kv, kv))
    # one unmasked key: every head's output is that key's value point
    only_first = torch.ones(2, 5, dtype=torch.bool)
    only_first[:, 0] = False
    value0 = attn.value(kv[:, :1])
    torch.testing.assert_close(attn(q, kv, kv, key_padding_mask=only_first), value0.expand(2, 5, 8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
def test_transformer_encoder_decoder(k, dtype):
    torch.manual_seed(0)
    m = LorentzManifold(k)
    enc = LorentzTransformerEncoder(m, 2, 8, 2, 16, dropout=0.1).to(dtype)
    dec = LorentzTransformerDecoder(m, 2, 8, 2, 16).to(dtype).eval()
    for x in inputs(k, dtype):
        memory = enc(x)
        assert_on_hyperboloid(memory, k)
        assert_on_hyperboloid(dec(x, memory), k)
    # causality: changing the last target position leaves the earlier outputs unchanged
    x = inputs(k, dtype)[1]
    memory = enc.eval()(x)
    y = x.clone()
    y[:, -1] = lm.origin((2, 8), k, dtype=dtype)
    torch.testing.assert_close(dec(y, memory)[:, :-1], dec(x, memory)[:, :-1])


def test_embedding_and_classifier():
    m = LorentzManifold(2.0)
    emb = LorentzEmbedding(m, 10, 5)
    assert_on_hyperboloid(emb(torch.tensor([[1, 2], [3, 9]])), 2.0)
    clf = LorentzDistanceClassifier(m, 5, 3)
    x = random_points(4, 5, 2.0, torch.float32)
    expected = -lm.sqdist(x.unsqueeze(1), clf.points.detach().unsqueeze(0), 2.0) + clf.bias
    torch.testing.assert_close(clf(x), expected, rtol=1e-4, atol=1e-4)


def test_gradients_finite_for_degenerate_inputs():
    """Zero space parts (e.g. all features dropped) and all-zero centroid weights: no NaN gradients."""
    m = LorentzManifold(1.0)
    layer = LorentzLinear(m, 5, 4, bias=False)
    x = torch.cat([lm.origin((3, 5), 1.0), random_points(3, 5, 1.0, torch.float32)]).requires_grad_(True)
    out = layer(x)
    assert_on_hyperboloid(out, 1.0)
    weights = torch.tensor([[0.0] * 6, [1.0] + [0.0] * 5, [0.5] * 6]).requires_grad_(True)
    (lm.centroid(out, 1.0, weights).sum() + out.sum()).backward()
    assert torch.isfinite(weights.grad).all()  # an all-zero weight row has no centroid: finite is all we ask
    for t in (x.grad, layer.linear.weight.grad, layer.log_scale.grad):
        assert torch.isfinite(t).all() and t.abs().max() < 1e3  # not merely finite: not exploding
