"""GPO (VSE-infinity's generalized pooling, docs/vse_infinity.md) against the reference fixture
``gpo_pool.npz`` (woodfrog/vse_infty ``GPO(32, 32)``, float32, atol 1e-5), plus masking, shape and
gradient properties."""

from __future__ import annotations

import pytest
import torch

from conftest import load_fixture
from itm.models.pooling import AvgPool, GPOPool, MaxPool, pool_scores

ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    return {k: v for k, v in load_fixture("gpo_pool").items()}


@pytest.fixture(scope="module")
def gpo(ref):
    """A GPOPool holding the reference's parameters (``gru.*``; ``linear.weight`` = scorer)."""
    pool = GPOPool(pe_dim=int(ref["d_pe"]), hidden=int(ref["d_hidden"]))
    assert pool.temperature == float(ref["softmax_temperature"])
    names = [str(n) for n in ref["param_names"]]
    gru = {n.removeprefix("gru."): torch.from_numpy(ref[n]) for n in names if n.startswith("gru.")}
    pool.gru.load_state_dict(gru)  # strict: every torch GRU name is there
    with torch.no_grad():
        pool.scorer.weight.copy_(torch.from_numpy(ref["linear.weight"]))
    return pool.eval()


def _t(a):
    return torch.from_numpy(a)


def _mask(lengths, n):
    return torch.arange(n)[None, :] < lengths[:, None]


def test_contract_parameters():
    pool = GPOPool()
    assert (pool.pe_dim, pool.hidden, pool.temperature) == (32, 32, 0.1)
    assert isinstance(pool.gru, torch.nn.GRU)
    assert pool.gru.bidirectional and pool.gru.batch_first
    assert (pool.gru.input_size, pool.gru.hidden_size, pool.gru.num_layers) == (32, 32, 1)
    assert isinstance(pool.scorer, torch.nn.Linear) and pool.scorer.bias is None
    assert pool.scorer.weight.shape == (1, 32)


def test_positional_encoding_matches_fixture(gpo, ref):
    pe = gpo.positional_encoding(5)
    assert pe.dtype == torch.float32
    torch.testing.assert_close(pe, _t(ref["pe_len5"]), rtol=0, atol=1e-7)
    # a longer encoding starts with the same rows
    torch.testing.assert_close(gpo.positional_encoding(40)[:5], pe, rtol=0, atol=0)


def test_pooled_and_weights_match_fixture(gpo, ref):
    x, lengths = _t(ref["features"]), _t(ref["lengths"])
    with torch.no_grad():
        pooled = gpo(x, _mask(lengths, x.shape[1]))
        weights = gpo.weights(lengths, int(lengths.max()))
    torch.testing.assert_close(pooled, _t(ref["pooled"]), rtol=0, atol=ATOL)
    torch.testing.assert_close(weights, _t(ref["weights"]), rtol=0, atol=ATOL)
    # padding weight exactly 0; valid weights sum to 1
    assert torch.all(weights[~_mask(lengths, weights.shape[1])] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3), rtol=0, atol=1e-6)


def test_extra_padded_slot_matches_fixture(gpo, ref):
    """K = 6 > max_len: the extra padded slot changes nothing."""
    x, lengths = _t(ref["extra_features_K6"]), _t(ref["lengths"])
    assert x.shape[1] == 6
    with torch.no_grad():
        pooled = gpo(x, _mask(lengths, 6))
        weights = gpo.weights(lengths, int(lengths.max()))
    torch.testing.assert_close(pooled, _t(ref["extra_pooled_K6"]), rtol=0, atol=ATOL)
    torch.testing.assert_close(weights, _t(ref["extra_weights_K6"]), rtol=0, atol=ATOL)


def test_all_valid_matches_fixture(gpo, ref):
    x = _t(ref["features"])
    lengths = torch.full((3,), 5)
    with torch.no_grad():
        pooled = gpo(x, _mask(lengths, 5))
        weights = gpo.weights(lengths, 5)
    torch.testing.assert_close(pooled, _t(ref["extra_pooled_all5"]), rtol=0, atol=ATOL)
    torch.testing.assert_close(weights, _t(ref["extra_weights_all5"]), rtol=0, atol=ATOL)


def test_hand_computed_from_weights(gpo, ref):
    """Output = sum_k theta_k * (k-th largest of each dimension over the valid items)."""
    x, lengths = _t(ref["features"]).double(), _t(ref["lengths"])
    with torch.no_grad():
        theta = gpo.weights(lengths, 5).double()
        out = gpo(x, _mask(lengths, 5))
    for b, n in enumerate(lengths.tolist()):
        ranked = x[b, :n].sort(dim=0, descending=True).values  # [n, D]
        expected = (theta[b, :n, None] * ranked).sum(0)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-6)


def test_garbage_padding_changes_nothing():
    torch.manual_seed(0)
    pool = GPOPool()
    x = torch.randn(4, 7, 5)
    lengths = torch.tensor([7, 1, 3, 5])
    mask = _mask(lengths, 7)
    y = x.clone()
    y[~mask] = 1e4
    z = x.clone()
    z[~mask] = -1e4
    with torch.no_grad():
        a, b, c = pool(x, mask), pool(y, mask), pool(z, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    # weights of a set depend only on its own length, not on the padded size
    w7 = pool.weights(lengths, 7)
    w9 = pool.weights(lengths, 9)
    torch.testing.assert_close(w9[:, :7], w7, rtol=0, atol=1e-6)
    assert torch.all(w9[:, 7:] == 0)


def test_non_prefix_mask_uses_only_valid_items():
    torch.manual_seed(1)
    pool = GPOPool()
    x = torch.randn(2, 6, 3)
    mask = torch.tensor([[True, False, True, False, True, False], [False] * 5 + [True]])
    with torch.no_grad():
        out = pool(x, mask)
        expected0 = pool(x[0, mask[0]][None], torch.ones(1, 3, dtype=torch.bool))[0]
    torch.testing.assert_close(out[0], expected0, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], x[1, 5], rtol=0, atol=1e-6)


def test_leading_shape_equals_per_set():
    torch.manual_seed(2)
    pool = GPOPool()
    x = torch.randn(2, 3, 6, 4)
    lengths = torch.tensor([[6, 2, 1], [3, 4, 5]])
    mask = torch.arange(6)[None, None, :] < lengths[..., None]
    with torch.no_grad():
        out = pool(x, mask)
        assert out.shape == (2, 3, 4)
        for i in range(2):
            for j in range(3):
                n = int(lengths[i, j])
                single = pool(x[i, j, :n][None], torch.ones(1, n, dtype=torch.bool))[0]
                torch.testing.assert_close(out[i, j], single, rtol=0, atol=1e-6)
        # a mask that only broadcasts: [3, N] shared by both rows of the leading axis
        shared = mask[0]
        torch.testing.assert_close(pool(x, shared), pool(x, shared.expand(2, 3, 6)))


def test_fragment_scores_via_pool_scores():
    """D = 1: a learned interpolation between max and mean of the valid scores."""
    torch.manual_seed(3)
    pool = GPOPool()
    s = torch.randn(3, 4, 7)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 2, 5, 1])[:, None]  # [4, 7] broadcast
    with torch.no_grad():
        out = pool_scores(pool, s, mask)
        assert out.shape == (3, 4)
        lo = pool_scores(AvgPool(), s, mask)
        hi = pool_scores(MaxPool(), s, mask)
        # sorted weights put mass on the largest: between mean and max (theta decreasing)
        assert torch.all(out <= hi + 1e-6)
        theta = pool.weights(torch.tensor([7, 2, 5, 1]), 7)
        if torch.all(theta[:, :-1] >= theta[:, 1:] - 1e-7):
            assert torch.all(out >= lo - 1e-6)
        # per-dimension equals the D = 1 case
        x = torch.randn(4, 7, 3)
        full = pool(x, mask)
        for dim in range(3):
            torch.testing.assert_close(pool_scores(pool, x[..., dim], mask), full[..., dim])


def test_temperature_limits():
    """Cold temperature -> close to a one-hot weight; the output stays a convex combination."""
    torch.manual_seed(4)
    pool = GPOPool(temperature=1e-4)
    x = torch.randn(2, 5, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        w = pool.weights(torch.tensor([5, 5]), 5)
        out = pool(x, mask)
    assert torch.all(w.max(-1).values > 0.99)
    assert torch.all(out <= x.amax(1) + 1e-6) and torch.all(out >= x.amin(1) - 1e-6)


def test_single_item_equals_the_item():
    torch.manual_seed(5)
    pool = GPOPool()
    x = torch.randn(3, 4, 6)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[:, 0] = True
    with torch.no_grad():
        torch.testing.assert_close(pool(x, mask), x[:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(
            pool.weights(torch.tensor([1]), 4), torch.tensor([[1.0, 0, 0, 0]])
        )


def test_empty_set_and_empty_axis_give_zeros():
    pool = GPOPool()
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = pool(x, mask)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()
    assert pool(torch.randn(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool)).shape == (2, 4)


def test_gradients_finite_with_zero_padding():
    torch.manual_seed(6)
    pool = GPOPool()
    lengths = torch.tensor([5, 1, 3])
    mask = _mask(lengths, 5)
    x = torch.randn(3, 5, 4)
    x[~mask] = 0.0
    x.requires_grad_(True)
    pool(x, mask).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[~mask] == 0)
    assert x.grad[mask].abs().sum() > 0
    for name, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert pool.scorer.weight.grad.abs().sum() > 0


def test_float64_inputs_and_module_dtype():
    torch.manual_seed(7)
    pool = GPOPool()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = _mask(torch.tensor([4, 2]), 4)
    with torch.no_grad():
        a = pool(x, mask)
        assert a.dtype == torch.float64
        b = pool.double()(x, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
