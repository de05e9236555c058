"""BFAN against the authors' fixture, a naive per-pair reference, padding garbage, the empty
focal set, gradients and block-wise scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import load_fixture
from itm.models import Similarity
from itm.models.align.attention import i2t_weights, region_word_scores, t2i_weights
from itm.models.align.bfan import BFAN, focal_mask
from itm.models.pooling import AvgPool, LSEPool
from itm.models.similarity import lengths_to_mask
from reference import attend, cosine, random_sets

ATOL = 1e-9
PARTS = {"both": "sims", "t2i": "sims_t2i_part", "i2t": "sims_i2t_part"}


def _t(x):
    return torch.as_tensor(np.asarray(x))


# --- naive reference: one pair at a time, attended vectors materialised -------------------


def _focus(w: np.ndarray, focal: str) -> np.ndarray:
    """``w [query, context]`` -> renormalised focal weights; an empty focal set keeps ``w``."""
    if focal == "equal":
        f = w.shape[1] * w - w.sum(1, keepdims=True)
    else:
        f = w * np.sqrt(w).sum(1, keepdims=True) - (w**1.5).sum(1, keepdims=True)
    keep = f > 0
    keep[~keep.any(1)] = True  # documented fallback (the reference gives NaN)
    kept = np.where(keep, w, 0.0)
    return kept / kept.sum(1, keepdims=True)


def _part(query: np.ndarray, context: np.ndarray, lam: float, focal: str) -> float:
    w, _ = attend(query, context, "clipped_l2norm", lam)
    return float(cosine(query, _focus(w, focal) @ context).mean())


def bfan_naive(img, img_lens, cap, cap_lens, direction, lam, focal):
    out = np.zeros((len(img), len(cap)))
    for i in range(len(img)):
        v = img[i, : img_lens[i]]
        for j in range(len(cap)):
            e = cap[j, : cap_lens[j]]
            if direction in ("t2i", "both"):
                out[i, j] += _part(e, v, lam, focal)
            if direction in ("i2t", "both"):
                out[i, j] += _part(v, e, lam, focal)
    return out


# --- the authors' fixture ------------------------------------------------------------------


@pytest.mark.parametrize("direction", sorted(PARTS))
@pytest.mark.parametrize("captions_key", ["captions", "captions_zero_pad"])
def test_fixture(direction, captions_key):
    f = load_fixture("bfan_equal")
    assert str(f["focal_type"]) == "equal" and float(f["lambda_softmax"]) == 20.0
    img, cap, cl = _t(f["images"]), _t(f[captions_key]), _t(f["cap_lens"])
    il = torch.full((img.shape[0],), img.shape[1])
    sim = Similarity(BFAN("equal", 20.0, direction), AvgPool())
    got = sim(img, il, cap, cl).numpy()
    np.testing.assert_allclose(got, f[PARTS[direction]], rtol=0, atol=ATOL)
    np.testing.assert_allclose(f["sims"], f["sims_t2i_part"] + f["sims_i2t_part"], atol=1e-12)


@pytest.mark.parametrize("captions_key", ["captions", "captions_zero_pad"])
def test_fixture_weights_and_focal_masks(captions_key):
    """``pre_attn_*`` / ``focal_mask_*`` are laid out [cap, img, query, context]."""
    f = load_fixture("bfan_equal")
    img, cap, cl = _t(f["images"]), _t(f[captions_key]), _t(f["cap_lens"])
    il = torch.full((img.shape[0],), img.shape[1])
    im, cm = lengths_to_mask(il, img.shape[1]), lengths_to_mask(cl, cap.shape[1])
    s = region_word_scores(img, cap)  # [img, region, cap, word]
    a_t2i = t2i_weights(s, im, cm, "clipped_l2norm", 20.0)
    a_i2t = i2t_weights(s, im, cm, "clipped_l2norm", 20.0)
    m_t2i = focal_mask(a_t2i, im[:, :, None, None], 1, "equal")
    m_i2t = focal_mask(a_i2t, cm[None, None], 3, "equal")
    for j, n in enumerate(f["cap_lens"]):
        # t2i: query = word, context = region -> [img, word, region]
        np.testing.assert_allclose(
            a_t2i[:, :, j, :n].permute(0, 2, 1).numpy(), f["pre_attn_t2i"][j, :, :n], atol=ATOL
        )
        np.testing.assert_array_equal(
            m_t2i[:, :, j, :n].permute(0, 2, 1).numpy(), f["focal_mask_t2i"][j, :, :n] == 1
        )
        # i2t: query = region, context = word -> [img, region, word]
        np.testing.assert_allclose(
            a_i2t[:, :, j, :n].numpy(), f["pre_attn_i2t"][j, :, :, :n], atol=ATOL
        )
        np.testing.assert_array_equal(
            m_i2t[:, :, j, :n].numpy(), f["focal_mask_i2t"][j, :, :, :n] == 1
        )


def test_fixture_with_garbage_regions():
    """Three extra region slots of garbage (img_lens = 5 of 8) change nothing."""
    f = load_fixture("bfan_equal")
    rng = np.random.default_rng(1)
    img = np.concatenate([f["images"], rng.standard_normal((3, 3, 8)) * 5], axis=1)
    sim = Similarity(BFAN(), AvgPool())
    got = sim(_t(img), torch.full((3,), 5), _t(f["captions"]), _t(f["cap_lens"]))
    np.testing.assert_allclose(got.numpy(), f["sims"], rtol=0, atol=ATOL)


# --- naive reference, padding, edge cases ---------------------------------------------------


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("focal", ["equal", "prob"])
def test_against_naive_reference(direction, focal):
    rng = np.random.default_rng(11)
    il, cl = np.array([4, 1, 6, 2]), np.array([5, 1, 3, 7, 2])
    img, cap = random_sets(rng, 4, 6, 16, il), random_sets(rng, 5, 7, 16, cl)
    expected = bfan_naive(img, il, cap, cl, direction, 20.0, focal)
    assert np.isfinite(expected).all()
    sim = Similarity(BFAN(focal, 20.0, direction), None)  # BFAN aggregates by itself
    got = sim(_t(img), _t(il), _t(cap), _t(cl)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    # a different lambda too (fewer near-one-hot weights, larger focal sets)
    expected = bfan_naive(img, il, cap, cl, direction, 4.0, focal)
    got = Similarity(BFAN(focal, 4.0, direction), AvgPool())(_t(img), _t(il), _t(cap), _t(cl))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("focal", ["equal", "prob"])
def test_garbage_equals_zero_padding(focal):
    rng = np.random.default_rng(3)
    il, cl = np.array([3, 6]), np.array([1, 4, 7])
    garbage = random_sets(rng, 2, 6, 8, il), random_sets(rng, 3, 7, 8, cl)
    zeros = [x.copy() for x in garbage]
    for x, lens in zip(zeros, (il, cl), strict=True):
        for b, n in enumerate(lens):
            x[b, n:] = 0
    sim = Similarity(BFAN(focal), AvgPool())
    a = sim(_t(garbage[0]), _t(il), _t(garbage[1]), _t(cl))
    b = sim(_t(zeros[0]), _t(il), _t(zeros[1]), _t(cl))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("focal", ["equal", "prob"])
def test_empty_focal_set_one_word_caption(focal):
    """i2t with a one-word caption: every region's single weight is 1, F = 0, nothing kept
    (the reference: NaN). Fallback = un-focused weights, so att_r = e and the i2t part is the
    mean over regions of cos(v_r, e)."""
    rng = np.random.default_rng(2)
    il, cl = np.array([5, 3]), np.array([1, 4])
    img, cap = random_sets(rng, 2, 5, 8, il), random_sets(rng, 2, 4, 8, cl)
    got = Similarity(BFAN(focal, direction="i2t"), AvgPool())(_t(img), _t(il), _t(cap), _t(cl))
    assert torch.isfinite(got).all()
    for i, k in enumerate(il):
        expected = cosine(img[i, :k], cap[0, :1]).mean()
        assert abs(float(got[i, 0]) - expected) < 1e-12
    both = Similarity(BFAN(focal), AvgPool())(_t(img), _t(il), _t(cap), _t(cl))
    np.testing.assert_allclose(
        both.numpy(), bfan_naive(img, il, cap, cl, "both", 20.0, focal), rtol=0, atol=ATOL
    )


@pytest.mark.parametrize("focal", ["equal", "prob"])
def test_empty_focal_set_identical_regions(focal):
    """Identical regions: equal t2i weights, no region above the others; att_w = v."""
    rng = np.random.default_rng(4)
    v = random_sets(rng, 1, 1, 8, [1])[0, 0]
    img = np.tile(v, (1, 4, 1))
    il, cl = np.array([4]), np.array([3, 1])
    cap = random_sets(rng, 2, 3, 8, cl)
    img_t = _t(img).requires_grad_(True)
    sim = Similarity(BFAN(focal, direction="t2i"), AvgPool())
    got = sim(img_t, _t(il), _t(cap), _t(cl))
    for j, n in enumerate(cl):
        assert abs(float(got.detach()[0, j]) - cosine(cap[j, :n], v[None]).mean()) < 1e-12
    got.sum().backward()
    assert torch.isfinite(img_t.grad).all()
    both = Similarity(BFAN(focal), AvgPool())(_t(img), _t(il), _t(cap), _t(cl))
    assert torch.isfinite(both).all()
    np.testing.assert_allclose(
        both.numpy(), bfan_naive(img, il, cap, cl, "both", 20.0, focal), rtol=0, atol=ATOL
    )


@pytest.mark.parametrize("focal", ["equal", "prob"])
def test_tied_weights_float32_fall_back_on_both_paths(focal):
    """float32 and identical regions: the tied weights' F lands a few ulps either side of 0;
    the set still counts as empty (fallback), in the forward and in the block engine, and the
    score is the exact one (att_w = v), not that of a rounding-chosen subset."""
    rng = np.random.default_rng(5)
    v = random_sets(rng, 1, 1, 8, [1])[0, 0]
    img = np.tile(v, (1, 7, 1)) + 0.0
    il, cl = np.array([7]), np.array([3, 5])
    cap = random_sets(rng, 2, 5, 8, cl)
    args = (_t(img).float(), _t(il), _t(cap).float(), _t(cl))
    sim = Similarity(BFAN(focal, direction="t2i"), AvgPool())
    with torch.no_grad():
        forward, blocks = sim(*args), sim.score_matrix(*args)
    alpha = torch.full((1, 7, 4), 1 / 7) * (1 + 1e-7 * torch.randn(1, 7, 4))
    assert not focal_mask(alpha, torch.ones(1, 7, 1, dtype=torch.bool), 1, focal).any()
    for j, n in enumerate(cl):
        expected = cosine(cap[j, :n], v[None]).mean()
        assert abs(float(forward[0, j]) - expected) < 1e-5
        assert abs(float(blocks[0, j]) - expected) < 1e-5


@pytest.mark.parametrize("focal", ["equal", "prob"])
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_gradients_finite_with_zero_padding(focal, direction):
    rng = np.random.default_rng(5)
    il, cl = np.array([2, 5, 1]), np.array([1, 3, 6])
    img = torch.tensor(random_sets(rng, 3, 5, 8, il, garbage=False), requires_grad=True)
    cap = torch.tensor(random_sets(rng, 3, 6, 8, cl, garbage=False), requires_grad=True)
    out = Similarity(BFAN(focal, 20.0, direction), AvgPool())(img, _t(il), cap, _t(cl))
    assert torch.isfinite(out).all()
    out.sum().backward()
    for x, lens in ((img, il), (cap, cl)):
        assert torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0
        for b, n in enumerate(lens):
            assert torch.all(x.grad[b, n:] == 0), "padding must receive no gradient"


def test_train_and_eval_mode_agree():
    rng = np.random.default_rng(0)
    img, cap = _t(random_sets(rng, 2, 4, 8, [4, 2])), _t(random_sets(rng, 3, 5, 8, [5, 1, 3]))
    sim = Similarity(BFAN("prob"), AvgPool())
    il, cl = torch.tensor([4, 2]), torch.tensor([5, 1, 3])
    a = sim.train()(img, il, cap, cl)
    b = sim.eval()(img, il, cap, cl)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("focal", ["equal", "prob"])
def test_score_matrix_tiny_budget_equals_forward(focal):
    rng = np.random.default_rng(8)
    il, cl = np.array([6, 1, 3, 6, 2]), np.array([7, 1, 2, 5, 7, 3, 1])
    img, cap = _t(random_sets(rng, 5, 6, 8, il)), _t(random_sets(rng, 7, 7, 8, cl))
    sim = Similarity(BFAN(focal), AvgPool())
    full = sim(img, _t(il), cap, _t(cl))
    for budget in (1e-6, 0.01, 256):
        got = sim.score_matrix(img, _t(il), cap, _t(cl), max_block_mb=budget)
        torch.testing.assert_close(got, full, rtol=0, atol=1e-12)
    one = sim.score_matrix(img[:1], _t(il[:1]), cap[1:2], _t(cl[1:2]), max_block_mb=1e-6)
    torch.testing.assert_close(one, full[:1, 1:2], rtol=0, atol=1e-12)


def test_float32_runs_and_matches():
    rng = np.random.default_rng(9)
    il, cl = np.array([5, 2]), np.array([4, 1, 6])
    img, cap = random_sets(rng, 2, 5, 8, il), random_sets(rng, 3, 6, 8, cl)
    sim = Similarity(BFAN(), AvgPool())
    a = sim(_t(img).float(), _t(il), _t(cap).float(), _t(cl))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.double(), sim(_t(img), _t(il), _t(cap), _t(cl)), atol=1e-5, rtol=0)


def test_config_defaults(compose):
    cfg = compose(["model/align=bfan"])
    node = cfg.model.align
    assert node._target_ == "itm.models.align.bfan.BFAN"
    assert {k: node[k] for k in node if k != "_target_"} == {
        "focal": "equal",
        "lambda_softmax": 20.0,
        "direction": "both",
    }
    sim = Similarity(instantiate(node), instantiate(cfg.model.pooling))
    assert isinstance(sim.align, BFAN) and sim.pooling is None  # BFAN pools by its own mean
    f = load_fixture("bfan_equal")
    img, cap, cl = _t(f["images"]), _t(f["captions"]), _t(f["cap_lens"])
    got = sim(img, torch.full((3,), 5), cap, cl)
    np.testing.assert_allclose(got.numpy(), f["sims"], rtol=0, atol=ATOL)
    cfg = compose(["model/align=bfan", "model.align.focal=prob", "pooling=avg"])
    assert instantiate(cfg.model.align).focal == "prob"


def test_bad_options_raise():
    with pytest.raises(ValueError, match="focal"):
        BFAN("uniform")
    with pytest.raises(ValueError, match="direction"):
        BFAN(direction="sideways")


def test_refuses_a_pooling_other_than_its_mean(compose):
    """BFAN fixes its aggregation (the mean): its config selects pooling=avg, and any other
    pooling is refused with BFAN's name instead of silently training the mean under the other
    pooling's name."""
    from hydra.utils import instantiate

    cfg = compose(["model/align=bfan"])
    assert cfg.model.pooling._target_.endswith("AvgPool")
    Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling))
    cfg = compose(["model/align=bfan", "pooling=lse"])
    with pytest.raises(ValueError, match="BFAN aggregates .* mean .* got LSEPool"):
        Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling))
    with pytest.raises(ValueError, match="BFAN"):
        Similarity(BFAN(), LSEPool())
