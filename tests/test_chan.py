"""CHAN hard alignment against the authors' fixture, a hand-computed case, padding garbage,
block-wise scoring and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import load_fixture
from itm.models import Similarity
from itm.models.align.chan import CHAN
from itm.models.pooling import AvgPool, LSEPool, MaxPool, SumPool
from reference import random_sets

ATOL = 1e-9
POOLS = {
    "Max": MaxPool,
    "Mean": AvgPool,
    "Sum": SumPool,
    "LSE": lambda: LSEPool(10.0, rescale=False),  # CHAN's belta 0.1 = lambda 10, no 1/lambda
}


def _t(x):
    return torch.as_tensor(np.asarray(x))


def _fixture_inputs(f, img=None, img_lens=None):
    img = _t(f["images"] if img is None else img)
    il = _t(f["img_lens"] if img_lens is None else img_lens)
    return img, il, _t(f["captions"]), _t(f["cap_lens"])


def test_fixture_vha_lse():
    f = load_fixture("chan_vha_lse")
    sim = Similarity(CHAN("t2i"), LSEPool(10.0, rescale=False))
    got = sim(*_fixture_inputs(f))
    np.testing.assert_allclose(got.numpy(), f["sims"], rtol=0, atol=ATOL)


class Capture(torch.nn.Module):
    """A pooling that records the fragment scores it is given (``[..., N, 1]``) and sums."""

    def forward(self, x, mask):
        self.x, self.mask = x.squeeze(-1), mask.expand(x.shape[:-1])
        return x.sum(dim=-2)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_fixture_coded_fragment_scores(direction):
    """Per-word maxima (VHA, ``coded_word_sims``, -1 at padded words) and per-region maxima
    (THA, ``tha_coded_region_sims``), both [img, cap, fragment], at valid fragments."""
    f = load_fixture("chan_vha_lse")
    pool = Capture()
    Similarity(CHAN(direction), pool)(*_fixture_inputs(f))
    key = "coded_word_sims" if direction == "t2i" else "tha_coded_region_sims"
    valid = pool.mask.numpy()
    if direction == "t2i":
        assert np.all(f[key][~valid] == f["mask_value"])
    np.testing.assert_allclose(pool.x.numpy()[valid], f[key][valid], rtol=0, atol=ATOL)


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_fixture_vha_pooling_variants(pool):
    f = load_fixture("chan_vha_lse")
    got = Similarity(CHAN("t2i"), POOLS[pool]())(*_fixture_inputs(f))
    np.testing.assert_allclose(got.numpy(), f[f"extra_vha_{pool}Pooling"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("pool", ["Mean", "LSE"])
def test_fixture_tha_pooling_variants(pool):
    f = load_fixture("chan_vha_lse")
    got = Similarity(CHAN("i2t"), POOLS[pool]())(*_fixture_inputs(f))
    np.testing.assert_allclose(got.numpy(), f[f"extra_tha_{pool}Pooling"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("pool", sorted(POOLS))
def test_fixture_with_garbage_regions(direction, pool):
    """Extra region slots of large garbage (img_lens = 5 of 8) change nothing."""
    f = load_fixture("chan_vha_lse")
    rng = np.random.default_rng(1)
    img = np.concatenate([f["images"], rng.standard_normal((3, 3, 8)) * 5], axis=1)
    sim = Similarity(CHAN(direction), POOLS[pool]())
    got = sim(*_fixture_inputs(f, img, np.full(3, 5)))
    want = sim(*_fixture_inputs(f))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_hand_computed_2x2():
    """Image A: regions (1,0), (0,1); image B: region (1,0) + a garbage slot. Caption a: words
    (0.6,0.8), (1,0); caption b: word (0,1) + a garbage slot. Region-word scores of (A, a):
    [[0.6, 1], [0.8, 0]] (rows = regions)."""
    g = 100.0
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [g, g]]], dtype=torch.float64)
    cap = torch.tensor([[[0.6, 0.8], [1.0, 0.0]], [[0.0, 1.0], [g, -g]]], dtype=torch.float64)
    il, cl = torch.tensor([2, 1]), torch.tensor([2, 1])
    # VHA word maxima: (A,a) 0.8, 1 | (A,b) 1 | (B,a) 0.6, 1 | (B,b) 0
    vha = {
        "Mean": [[0.9, 1.0], [0.8, 0.0]],
        "Max": [[1.0, 1.0], [1.0, 0.0]],
        "Sum": [[1.8, 1.0], [1.6, 0.0]],
        "LSE": [
            [math.log(math.exp(8) + math.exp(10)), 10.0],
            [math.log(math.exp(6) + math.exp(10)), 0.0],
        ],
    }
    for pool, want in vha.items():
        got = Similarity(CHAN("t2i"), POOLS[pool]())(img, il, cap, cl)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    # THA region maxima: (A,a) 1, 0.8 | (A,b) 0, 1 | (B,a) 1 | (B,b) 0
    got = Similarity(CHAN("i2t"), AvgPool())(img, il, cap, cl)
    np.testing.assert_allclose(got.numpy(), [[0.9, 0.5], [1.0, 0.0]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_garbage_equals_zero_padding(direction):
    rng = np.random.default_rng(3)
    il, cl = np.array([3, 6, 1]), np.array([1, 4, 7])
    garbage = random_sets(rng, 3, 6, 8, il), random_sets(rng, 3, 7, 8, cl)
    zeros = [x.copy() for x in garbage]
    for x, lens in zip(zeros, (il, cl), strict=True):
        for b, n in enumerate(lens):
            x[b, n:] = 0
    for pool in POOLS.values():
        sim = Similarity(CHAN(direction), pool())
        a = sim(_t(garbage[0]), _t(il), _t(garbage[1]), _t(cl))
        b = sim(_t(zeros[0]), _t(il), _t(zeros[1]), _t(cl))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_score_matrix_equals_forward(direction):
    rng = np.random.default_rng(8)
    il, cl = np.array([6, 1, 3, 6, 2]), np.array([7, 1, 2, 5, 7, 3, 1])
    img, cap = _t(random_sets(rng, 5, 6, 8, il)), _t(random_sets(rng, 7, 7, 8, cl))
    il, cl = _t(il), _t(cl)
    sim = Similarity(CHAN(direction), LSEPool(10.0, rescale=False))
    full = sim(img, il, cap, cl)
    for budget in (1e-6, 0.01, 256):
        torch.testing.assert_close(
            sim.score_matrix(img, il, cap, cl, budget), full, atol=1e-12, rtol=0
        )
    # one image; one one-token caption; both at once
    torch.testing.assert_close(
        sim.score_matrix(img[:1], il[:1], cap, cl, 1e-6), full[:1], atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        sim.score_matrix(img, il, cap[1:2, :1], cl[1:2], 1e-6), full[:, 1:2], atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        sim(img[1:2, :1], il[1:2], cap[1:2, :1], cl[1:2]), full[1:2, 1:2], atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("pool", sorted(POOLS))
def test_gradients_finite_with_zero_padding(direction, pool):
    rng = np.random.default_rng(5)
    il, cl = np.array([2, 5, 1]), np.array([1, 3, 6])
    img = torch.tensor(random_sets(rng, 3, 5, 8, il, garbage=False), requires_grad=True)
    cap = torch.tensor(random_sets(rng, 3, 6, 8, cl, garbage=False), requires_grad=True)
    out = Similarity(CHAN(direction), POOLS[pool]())(img, _t(il), cap, _t(cl))
    out.sum().backward()
    for x, lens in ((img, il), (cap, cl)):
        assert torch.isfinite(x.grad).all()
        for b, n in enumerate(lens):
            assert torch.all(x.grad[b, n:] == 0), "padding must receive no gradient"


def test_train_and_eval_mode_agree():
    rng = np.random.default_rng(0)
    img, cap = _t(random_sets(rng, 2, 4, 8, [4, 2])), _t(random_sets(rng, 3, 5, 8, [5, 1, 3]))
    sim = Similarity(CHAN(), LSEPool(10.0, rescale=False))
    il, cl = torch.tensor([4, 2]), torch.tensor([5, 1, 3])
    torch.testing.assert_close(
        sim.train()(img, il, cap, cl), sim.eval()(img, il, cap, cl), rtol=0, atol=0
    )


def test_bytes_per_pair_covers_two_buffers():
    assert CHAN().bytes_per_pair(36, 20, 4) >= 2 * 36 * 20 * 4


def test_config_defaults(compose):
    cfg = compose(["model/align=chan"])
    node = cfg.model.align
    assert node._target_ == "itm.models.align.chan.CHAN"
    assert {k: node[k] for k in node if k != "_target_"} == {"direction": "t2i"}
    cfg = compose(
        [
            "model/align=chan",
            "pooling=lse",
            "model.pooling.lambda_lse=10",
            "model.pooling.rescale=false",
        ]
    )
    sim = Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling))
    assert isinstance(sim.align, CHAN) and sim.align.direction == "t2i"
    f = load_fixture("chan_vha_lse")
    np.testing.assert_allclose(sim(*_fixture_inputs(f)).numpy(), f["sims"], rtol=0, atol=ATOL)
    cfg = compose(["model/align=chan", "model.align.direction=i2t", "pooling=avg"])
    sim = Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling))
    got = sim(*_fixture_inputs(f))
    np.testing.assert_allclose(got.numpy(), f["extra_tha_MeanPooling"], rtol=0, atol=ATOL)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="direction"):
        CHAN("both")
