"""Evaluation protocols and fold slicing on hand-made matrices; ensemble averaging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itm.metrics import ensemble, evaluate_protocol, recall_at_k


def _perfect(n_img: int, cpi: int = 5) -> np.ndarray:
    """Every caption scores highest with its own image."""
    sims = np.zeros((n_img, n_img * cpi))
    sims[np.arange(n_img * cpi) // cpi, np.arange(n_img * cpi)] = 1.0
    return sims


def test_f30k_perfect_and_hand_ranks():
    m = recall_at_k(_perfect(4))
    assert m["i2t_r1"] == m["t2i_r1"] == 100.0 and m["rsum"] == 600.0
    assert m["i2t_medr"] == m["t2i_medr"] == 1.0 and m["i2t_meanr"] == 1.0
    # hand-made: image 0's captions all rank below one caption of image 1 (i2t rank 1)
    sims = _perfect(2, cpi=1)  # 2 images x 2 captions
    sims[0, 1] = 2.0
    m = recall_at_k(sims, captions_per_image=1)
    assert m["i2t_r1"] == 50.0 and m["i2t_r5"] == 100.0
    assert m["t2i_r1"] == 50.0  # caption 1's true image (1) scores 1 < image 0's 2
    assert m["i2t_meanr"] == 1.5 and m["t2i_meanr"] == 1.5


def test_coco1k_slices_folds_and_averages():
    """Fold f = images f*F..f*F+F-1 and captions 5fF..5(f+1)F-1; off-fold entries never
    count; rsum = sum of the fold-AVERAGED recalls."""
    fold, cpi = 3, 5
    sims = _perfect(5 * fold)
    # huge off-fold scores would ruin coco5k but not coco1k
    sims[0, 5 * fold * cpi - 1] = 10.0
    # in fold 2, image 6's first caption prefers image 7: one t2i miss in that fold
    sims[7, 6 * cpi] = 5.0
    out = evaluate_protocol(sims, "coco1k", fold_images=fold)
    assert len(out["folds"]) == 5
    assert [f["t2i_r1"] for f in out["folds"]] == [100.0, 100.0, 100 * 14 / 15, 100.0, 100.0]
    expected_t2i_r1 = np.mean([f["t2i_r1"] for f in out["folds"]])
    assert out["t2i_r1"] == pytest.approx(expected_t2i_r1)
    assert out["rsum"] == pytest.approx(
        sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    )
    five_k = evaluate_protocol(sims, "coco5k")
    assert five_k["i2t_r1"] < 100.0  # the off-fold caption counts in 5K
    both = evaluate_protocol(sims, "coco1k+5k", fold_images=fold)
    assert both["coco5k"] == five_k and both["coco1k"]["rsum"] == out["rsum"]


def test_coco1k_rsum_is_not_the_mean_of_fold_rsums_when_medr_differs():
    """The fold average of rsum equals the sum of averaged recalls (linear), and the protocol
    reports exactly that sum; check against an explicit per-fold computation."""
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((10, 50))
    out = evaluate_protocol(sims, "coco1k", fold_images=2)
    folds = [recall_at_k(sims[2 * f : 2 * f + 2, 10 * f : 10 * f + 10]) for f in range(5)]
    for key in ("i2t_r1", "t2i_r10", "i2t_medr", "t2i_meanr"):
        assert out[key] == pytest.approx(np.mean([f[key] for f in folds]))


def test_bad_shapes_and_names():
    with pytest.raises(ValueError, match="coco1k"):
        evaluate_protocol(_perfect(7), "coco1k", fold_images=2)
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        evaluate_protocol(_perfect(2), "f8k")


def test_ensemble_averages_numpy_and_torch():
    a, b = np.arange(6.0).reshape(2, 3), np.ones((2, 3))
    np.testing.assert_allclose(ensemble([a, b]), (a + b) / 2)
    t = ensemble([torch.tensor(a), b])
    assert isinstance(t, torch.Tensor)
    torch.testing.assert_close(t, torch.tensor((a + b) / 2))
    with pytest.raises(ValueError, match="same shape"):
        ensemble([a, np.ones((3, 2))])
    # ranking the average: two models that each fail differently agree once averaged
    m1, m2 = _perfect(2, cpi=1), _perfect(2, cpi=1)
    m1[0, 1], m2[1, 0] = 1.5, 1.5
    assert recall_at_k(m1, 1)["rsum"] < 600 and recall_at_k(m2, 1)["rsum"] < 600
    assert recall_at_k(ensemble([m1, m2, _perfect(2, cpi=1) * 4]), 1)["rsum"] == 600
