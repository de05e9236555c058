"""SCAN against the authors' fixtures, a naive reference, padding garbage and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import load_fixture
from itm.models import Similarity
from itm.models.align.attention import (
    FEATURE_NORMS,
    gram,
    i2t_weights,
    region_word_scores,
    sq_norm,
    t2i_cosine,
    t2i_weights,
)
from itm.models.align.scan import SCAN
from itm.models.pooling import AvgPool, LSEPool, MaxPool, SumPool
from itm.models.similarity import lengths_to_mask
from reference import random_sets, scan_scores

POOLS = {"avg": AvgPool, "max": MaxPool, "sum": SumPool, "lse": lambda: LSEPool(6.0)}


def _t(x):
    return torch.as_tensor(np.asarray(x))


@pytest.mark.parametrize("captions_key", ["captions", "captions_zero_pad"])
def test_fixture_t2i_lse(captions_key):
    f = load_fixture("scan_t2i_clipped_l2norm_lse")
    sim = Similarity(SCAN("t2i", 9.0, "clipped_l2norm"), LSEPool(6.0))
    img, cap, cl = _t(f["images"]), _t(f[captions_key]), _t(f["cap_lens"])
    il = torch.full((img.shape[0],), img.shape[1])
    np.testing.assert_allclose(sim(img, il, cap, cl).numpy(), f["sims"], rtol=0, atol=1e-9)
    # internals: attention weights [cap, img, region, word] and per-word cosines [cap, img, word]
    s = region_word_scores(img, cap)
    im, cm = lengths_to_mask(il, img.shape[1]), lengths_to_mask(cl, cap.shape[1])
    alpha = t2i_weights(s, im, cm, "clipped_l2norm", 9.0)
    local = t2i_cosine(s, alpha, gram(img), sq_norm(cap))
    for j, n in enumerate(f["cap_lens"]):
        np.testing.assert_allclose(
            alpha[:, :, j, :n].numpy(), f["attn"][j, :, :, :n], rtol=0, atol=1e-9
        )
        np.testing.assert_allclose(local[:, j, :n].numpy(), f["local_sim"][j, :, :n], atol=1e-9)


@pytest.mark.parametrize("captions_key", ["captions", "captions_zero_pad"])
def test_fixture_i2t_mean(captions_key):
    f = load_fixture("scan_i2t_clipped_l2norm_mean")
    sim = Similarity(SCAN("i2t", 4.0, "clipped_l2norm"), AvgPool())
    img, cap, cl = _t(f["images"]), _t(f[captions_key]), _t(f["cap_lens"])
    il = torch.full((img.shape[0],), img.shape[1])
    np.testing.assert_allclose(sim(img, il, cap, cl).numpy(), f["sims"], rtol=0, atol=1e-9)
    s = region_word_scores(img, cap)
    im, cm = lengths_to_mask(il, img.shape[1]), lengths_to_mask(cl, cap.shape[1])
    alpha = i2t_weights(s, im, cm, "clipped_l2norm", 4.0)  # [img, region, cap, word]
    for j, n in enumerate(f["cap_lens"]):
        np.testing.assert_allclose(
            alpha[:, :, j, :n].numpy(), f["attn"][j, :, :, :n], rtol=0, atol=1e-9
        )


def test_fixture_with_garbage_regions():
    """Extra padded regions holding garbage (img_lens = 5 of 8 slots) change nothing."""
    f = load_fixture("scan_t2i_clipped_l2norm_lse")
    rng = np.random.default_rng(1)
    img = np.concatenate([f["images"], rng.standard_normal((3, 3, 8)) * 5], axis=1)
    sim = Similarity(SCAN("both", 9.0), LSEPool(6.0))
    il = torch.full((3,), 5)
    a = sim(_t(img), il, _t(f["captions"]), _t(f["cap_lens"]))
    b = sim(_t(f["images"]), il, _t(f["captions_zero_pad"]), _t(f["cap_lens"]))
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-12)


def test_hand_computed_single_pair():
    """Two orthogonal regions, one word at 0.6/0.8: each region's clipped-l2-normed score is
    ~1 (one word), so attention is uniform, att = (v1+v2)/2 and cos = 0.7/(1*sqrt(0.5))."""
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    cap = torch.tensor([[[0.6, 0.8]]], dtype=torch.float64)
    one, two = torch.tensor([1]), torch.tensor([2])
    out = Similarity(SCAN("t2i", 9.0), AvgPool())(img, two, cap, one)
    norm_scores = torch.tensor([0.6 / (0.6 + 1e-8), 0.8 / (0.8 + 1e-8)], dtype=torch.float64)
    w = torch.softmax(9.0 * norm_scores, 0)
    att = w[0] * img[0, 0] + w[1] * img[0, 1]
    expected = (cap[0, 0] @ att) / att.norm()
    assert abs(float(out) - float(expected)) < 1e-12
    assert abs(float(out) - 0.7 / 0.5**0.5) < 1e-6
    # no_norm: softmax of 9 * (0.6, 0.8) directly
    out = Similarity(SCAN("t2i", 9.0, "no_norm"), AvgPool())(img, two, cap, one)
    w = torch.softmax(torch.tensor([5.4, 7.2], dtype=torch.float64), 0)
    expected = (0.6 * w[0] + 0.8 * w[1]) / torch.sqrt(w[0] ** 2 + w[1] ** 2)
    assert abs(float(out) - float(expected)) < 1e-12


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("kind", FEATURE_NORMS)
def test_against_naive_reference(direction, kind):
    rng = np.random.default_rng(7)
    il, cl = np.array([4, 1, 6]), np.array([5, 1, 3, 7, 2])
    img, cap = random_sets(rng, 3, 6, 16, il), random_sets(rng, 5, 7, 16, cl)
    pooling = "lse" if direction != "i2t" else "avg"
    expected = scan_scores(img, il, cap, cl, direction, 5.0, kind, pooling)
    sim = Similarity(SCAN(direction, 5.0, kind), POOLS[pooling]())
    got = sim(_t(img), _t(il), _t(cap), _t(cl)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("pool", sorted(POOLS))
def test_garbage_equals_zero_padding(pool):
    rng = np.random.default_rng(3)
    il, cl = np.array([3, 6]), np.array([1, 4, 7])
    garbage = random_sets(rng, 2, 6, 8, il), random_sets(rng, 3, 7, 8, cl)
    zeros = [x.copy() for x in garbage]
    for x, lens in zip(zeros, (il, cl), strict=True):
        for b, n in enumerate(lens):
            x[b, n:] = 0
    sim = Similarity(SCAN("both", 9.0), POOLS[pool]())
    a = sim(_t(garbage[0]), _t(il), _t(garbage[1]), _t(cl))
    b = sim(_t(zeros[0]), _t(il), _t(zeros[1]), _t(cl))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", FEATURE_NORMS)
def test_gradients_finite_with_zero_padding(kind):
    rng = np.random.default_rng(5)
    il, cl = np.array([2, 5]), np.array([1, 3, 6])
    img = torch.tensor(random_sets(rng, 2, 5, 8, il, garbage=False), requires_grad=True)
    cap = torch.tensor(random_sets(rng, 3, 6, 8, cl, garbage=False), requires_grad=True)
    out = Similarity(SCAN("both", 9.0, kind), LSEPool(6.0))(img, _t(il), cap, _t(cl))
    out.sum().backward()
    for x, lens in ((img, il), (cap, cl)):
        assert torch.isfinite(x.grad).all()
        for b, n in enumerate(lens):
            assert torch.all(x.grad[b, n:] == 0), "padding must receive no gradient"


def test_train_and_eval_mode_agree():
    rng = np.random.default_rng(0)
    img, cap = _t(random_sets(rng, 2, 4, 8, [4, 2])), _t(random_sets(rng, 3, 5, 8, [5, 1, 3]))
    sim = Similarity(SCAN("both"), LSEPool())
    il, cl = torch.tensor([4, 2]), torch.tensor([5, 1, 3])
    a = sim.train()(img, il, cap, cl)
    b = sim.eval()(img, il, cap, cl)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="direction"):
        SCAN("sideways")
    with pytest.raises(ValueError, match="feature_norm"):
        SCAN("t2i", feature_norm="l1norm")
