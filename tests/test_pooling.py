"""Pooling over masked sets: hand-computed values, garbage invariance, stability."""

from __future__ import annotations

import math

import pytest
import torch

from itm.models.pooling import AvgPool, LSEPool, MaxPool, SumPool, pool_scores

X = torch.tensor([[1.0, 2.0, 1e6], [3.0, -5.0, -4.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, False], [True, True, True]])


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        (AvgPool(), [1.5, -2.0]),
        (SumPool(), [3.0, -6.0]),
        (MaxPool(), [2.0, 3.0]),
        (
            LSEPool(6.0),
            [
                math.log(math.exp(6) + math.exp(12)) / 6,
                math.log(math.exp(18) + math.exp(-30) + math.exp(-24)) / 6,
            ],
        ),
        (
            LSEPool(10.0, rescale=False),
            [
                math.log(math.exp(10) + math.exp(20)),
                math.log(math.exp(30) + math.exp(-50) + math.exp(-40)),
            ],
        ),
    ],
)
def test_hand_computed(pool, expected):
    out = pool_scores(pool, X, MASK)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pool", [AvgPool(), SumPool(), MaxPool(), LSEPool(6.0)])
def test_feature_sets_and_garbage(pool):
    """x [..., N, D]: per-dimension pooling; padded garbage changes nothing, gradient is 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.arange(5)[None, None, :] < torch.tensor([[5, 2, 1], [3, 4, 5]])[..., None]
    y = x.clone()
    y[~mask] = 1e3
    y.requires_grad_(True)
    a, b = pool(x, mask), pool(y, mask)
    assert a.shape == (2, 3, 4)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    b.sum().backward()
    assert torch.all(y.grad[~mask] == 0)
    assert torch.isfinite(y.grad).all()
    # per-dimension: pooling dim 0 alone equals pooling the D=1 set
    torch.testing.assert_close(pool_scores(pool, x[..., 0], mask), a[..., 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lse_no_overflow(dtype):
    x = torch.tensor([[50.0, 49.0, 0.0]], dtype=dtype)
    mask = torch.tensor([[True, True, False]])
    out = pool_scores(LSEPool(20.0), x, mask)
    assert torch.isfinite(out).all()
    expected = 50.0 + math.log1p(math.exp(-20.0)) / 20.0
    assert abs(float(out) - expected) < (1e-4 if dtype == torch.float32 else 0.5)
