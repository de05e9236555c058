"""Block-wise full-matrix scoring equals one-block scoring; input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itm.models import Similarity
from itm.models.align.scan import SCAN
from itm.models.pooling import AvgPool, LSEPool
from reference import random_sets


def _data(seed=0, n_img=7, n_cap=11, k=5, n_words=9, d=16):
    rng = np.random.default_rng(seed)
    il = rng.integers(1, k + 1, n_img)
    cl = rng.integers(1, n_words + 1, n_cap)
    cl[0] = 1  # a one-token caption
    img = torch.tensor(random_sets(rng, n_img, k, d, il))
    cap = torch.tensor(random_sets(rng, n_cap, n_words, d, cl))
    return img, torch.tensor(il), cap, torch.tensor(cl)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("budget_mb", [1e-9, 0.004, 0.05, 256])
def test_blockwise_equals_one_block(direction, budget_mb):
    img, il, cap, cl = _data()
    sim = Similarity(SCAN(direction, 9.0), LSEPool(6.0) if direction != "i2t" else AvgPool())
    full = sim(img, il, cap, cl)
    blocks = sim.score_matrix(img, il, cap, cl, max_block_mb=budget_mb)
    torch.testing.assert_close(blocks, full, rtol=0, atol=1e-12)


def test_tiny_budget_means_one_pair_blocks():
    img, il, cap, cl = _data(n_img=3, n_cap=4)
    sim = Similarity(SCAN("t2i"), LSEPool())
    sizes = []
    sim.score_matrix(img, il, cap, cl, max_block_mb=1e-9, progress=sizes.append)
    assert sizes == [1] * 12


def test_single_image_and_single_caption():
    img, il, cap, cl = _data(n_img=1, n_cap=1)
    sim = Similarity(SCAN("both"), LSEPool())
    torch.testing.assert_close(sim.score_matrix(img, il, cap, cl), sim(img, il, cap, cl))


def test_block_sizes_follow_budget():
    sim = Similarity(SCAN("t2i"), LSEPool())
    b1, b2 = sim.block_sizes(36, 20, 4, 256, n_img=10_000)
    assert b1 * b2 * sim.align.bytes_per_pair(36, 20, 4) <= 256 * 2**20
    assert b2 >= 64 and b1 >= 64


@pytest.mark.parametrize(
    ("field", "bad", "match"),
    [
        ("il", torch.tensor([0, 2, 1, 1, 1, 1, 1]), "img_lens"),
        ("cl", torch.full((11,), 99), "cap_lens"),
        ("cl", torch.ones(3, dtype=torch.long), "cap_lens"),
    ],
)
def test_bad_lengths_raise(field, bad, match):
    img, il, cap, cl = _data()
    args = {"il": il, "cl": cl, field: bad}
    with pytest.raises(ValueError, match=match):
        Similarity(SCAN(), LSEPool())(img, args["il"], cap, args["cl"])


def test_float32_matches_float64():
    img, il, cap, cl = _data(seed=4)
    sim = Similarity(SCAN("both"), LSEPool())
    a = sim(img, il, cap, cl)
    b = sim.score_matrix(img.float(), il, cap.float(), cl)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b.double(), a, rtol=0, atol=1e-5)
