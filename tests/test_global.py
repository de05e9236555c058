"""The `global` head (VSE-infinity, docs/vse_infinity.md): per-modality pooling of the
fragment features, l2-normalisation, cosine."""

from __future__ import annotations

import torch

from itm.models.align.vse_infinity import GlobalAlign
from itm.models.pooling import AvgPool, GPOPool, MaxPool
from itm.models.similarity import Similarity


def _data(n_img=3, n_cap=5, k=4, n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, k, d, generator=g, dtype=torch.float64)
    cap = torch.randn(n_cap, n, d, generator=g, dtype=torch.float64)
    il = torch.randint(1, k + 1, (n_img,), generator=g)
    cl = torch.randint(1, n + 1, (n_cap,), generator=g)
    il[0], cl[0] = k, n
    return img, il, cap, cl


def test_hand_computed_avg():
    img = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [99.0, -7.0]]], dtype=torch.float64)
    il = torch.tensor([2])
    cap = torch.tensor(
        [[[0.0, 1.0], [5.0, 5.0]], [[-1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64
    )  # caption 1 has one word; its padded slot holds zeros
    cl = torch.tensor([1, 1])
    sim = Similarity(GlobalAlign(), AvgPool())
    out = sim(img, il, cap, cl)
    # image mean (2, 1); caption means (0, 1) and (-1, 0)
    v = torch.tensor([2.0, 1.0], dtype=torch.float64)
    expected = torch.stack(
        [v @ torch.tensor([0.0, 1.0]).double(), v @ torch.tensor([-1.0, 0.0]).double()]
    ) / ((5**0.5 + 1e-8) * (1.0 + 1e-8))  # both vectors: x / (||x|| + 1e-8)
    torch.testing.assert_close(out, expected[None], rtol=0, atol=1e-12)
    assert abs(float(out[0, 0]) - 1 / 5**0.5) < 1e-7 and abs(float(out[0, 1]) + 2 / 5**0.5) < 1e-7


def test_matches_explicit_cosine_of_pooled_vectors():
    img, il, cap, cl = _data()
    for pool in (AvgPool(), MaxPool()):
        out = Similarity(GlobalAlign(), pool)(img, il, cap, cl)
        for i in range(img.shape[0]):
            for j in range(cap.shape[0]):
                v = pool(img[i, : il[i]][None], torch.ones(1, int(il[i]), dtype=torch.bool))[0]
                e = pool(cap[j, : cl[j]][None], torch.ones(1, int(cl[j]), dtype=torch.bool))[0]
                expected = (v / (v.norm() + 1e-8)) @ (e / (e.norm() + 1e-8))
                torch.testing.assert_close(out[i, j], expected, rtol=0, atol=1e-12)
        assert out.abs().max() <= 1 + 1e-12


def test_gpo_copies_are_independent():
    pool = GPOPool()
    head = GlobalAlign()
    sim = Similarity(head, pool)
    assert sim.pooling is None
    assert isinstance(head.image_pool, GPOPool) and isinstance(head.text_pool, GPOPool)
    assert head.image_pool is not pool and head.text_pool is not pool
    assert head.image_pool is not head.text_pool
    # same initial values (copies), distinct storage
    for a, b in zip(head.image_pool.parameters(), head.text_pool.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    names = {n for n, _ in sim.named_parameters()}
    assert "align.image_pool.gru.weight_ih_l0" in names
    assert "align.text_pool.scorer.weight" in names
    assert not any(n.startswith("pooling.") for n in names)
    # changing one copy changes the image side only
    img, il, cap, cl = (t.float() if t.is_floating_point() else t for t in _data())
    im, cm = sim_mask(il, img), sim_mask(cl, cap)
    with torch.no_grad():
        before = sim(img, il, cap, cl)
        v_before, e_before = head.embed(img, im, cap, cm)
        head.image_pool.scorer.weight.mul_(-3.0)
        v_after, e_after = head.embed(img, im, cap, cm)
        after = sim(img, il, cap, cl)
    torch.testing.assert_close(e_after, e_before, rtol=0, atol=0)
    assert not torch.allclose(v_after, v_before)
    assert not torch.allclose(after, before)


def sim_mask(lens, x):
    return torch.arange(x.shape[1])[None, :] < lens[:, None]


def test_gpo_gradients_reach_both_copies():
    img, il, cap, cl = (t.float() if t.is_floating_point() else t for t in _data())
    head = GlobalAlign()
    sim = Similarity(head, GPOPool())
    img = img.clone().requires_grad_(True)
    sim(img, il, cap, cl).sum().backward()
    for part in (head.image_pool, head.text_pool):
        for name, p in part.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert part.scorer.weight.grad.abs().sum() > 0
    assert torch.all(img.grad[~sim_mask(il, img)] == 0)
    assert torch.isfinite(img.grad).all()


def test_garbage_padding_invariant():
    img, il, cap, cl = _data()
    img2, cap2 = img.clone(), cap.clone()
    img2[~sim_mask(il, img)] = 1e6
    cap2[~sim_mask(cl, cap)] = -1e6
    for pool in (AvgPool(), MaxPool(), GPOPool().double()):
        sim = Similarity(GlobalAlign(), pool)
        with torch.no_grad():
            torch.testing.assert_close(
                sim(img, il, cap, cl), sim(img2, il, cap2, cl), rtol=0, atol=1e-12
            )


def test_score_matrix_equals_forward():
    img, il, cap, cl = _data(n_img=5, n_cap=11)
    for pool in (AvgPool(), GPOPool().double()):
        sim = Similarity(GlobalAlign(), pool)
        with torch.no_grad():
            full = sim(img, il, cap, cl)
        torch.testing.assert_close(sim.score_matrix(img, il, cap, cl), full, rtol=0, atol=1e-12)
        tiny = sim.score_matrix(img, il, cap, cl, max_block_mb=1e-9)
        torch.testing.assert_close(tiny, full, rtol=0, atol=1e-12)


def test_block_sizes_within_budget():
    sim = Similarity(GlobalAlign(), AvgPool())
    b1, b2 = sim.block_sizes(36, 20, 4, 256, n_img=10_000)
    assert b1 * b2 * sim.align.bytes_per_pair(36, 20, 4) <= 256 * 2**20
    assert b2 >= 64 and b1 >= 64


def test_unbound_head_uses_the_given_pooling():
    img, il, cap, cl = _data()
    head = GlobalAlign()
    out = head(img, sim_mask(il, img), cap, sim_mask(cl, cap), AvgPool())
    torch.testing.assert_close(out, Similarity(GlobalAlign(), AvgPool())(img, il, cap, cl))


def test_compose_global_gpo(compose):
    from hydra.utils import instantiate

    cfg = compose(["model/align=global", "pooling=gpo"])
    assert cfg.model.pooling.pe_dim == 32 and cfg.model.pooling.hidden == 32
    assert cfg.model.pooling.temperature == 0.1
    sim = Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling))
    assert isinstance(sim.align, GlobalAlign) and sim.pooling is None
    names = [n for n, _ in sim.named_parameters()]
    assert any(n.startswith("align.image_pool.gru") for n in names)
    assert any(n.startswith("align.text_pool.scorer") for n in names)
    img, il, cap, cl = (t.float() if t.is_floating_point() else t for t in _data())
    out = sim(img, il, cap, cl)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
