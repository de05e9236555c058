"""The block-wise scoring engine (``Similarity.score_matrix`` -> ``AlignHead.score_block``)
equals the direct ``Similarity`` result for every head: random blocks, padding garbage,
1-image / 1-token edge cases, every budget; the loop baselines of the benchmark agree too."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from itm.models import Similarity
from itm.models.align.bfan import BFAN
from itm.models.align.chan import CHAN
from itm.models.align.engine import Workspace
from itm.models.align.imram import IMRAM
from itm.models.align.scan import SCAN
from itm.models.align.vse_infinity import GlobalAlign
from itm.models.pooling import AvgPool, GPOPool, LSEPool, MaxPool, SumPool
from reference import random_sets

sys.path.insert(0, str(ROOT / "bench"))
import baselines  # noqa: E402


def _data(seed=0, n_img=6, n_cap=9, k=5, n_words=8, d=12, full_images=False):
    rng = np.random.default_rng(seed)
    il = np.full(n_img, k) if full_images else rng.integers(1, k + 1, n_img)
    cl = rng.integers(1, n_words + 1, n_cap)
    cl[0] = 1  # a one-token caption
    if not full_images and n_img > 1:
        il[1] = 1  # a one-region image
    img = torch.tensor(random_sets(rng, n_img, k, d, il))
    cap = torch.tensor(random_sets(rng, n_cap, n_words, d, cl))
    return img, torch.tensor(il), cap, torch.tensor(cl)


def _heads():
    torch.manual_seed(0)
    out = {}
    for direction in ("t2i", "i2t", "both"):
        out[f"scan_{direction}_lse"] = (SCAN(direction, 9.0), LSEPool(6.0))
        out[f"scan_{direction}_avg"] = (SCAN(direction, 4.0), AvgPool())
        out[f"bfan_equal_{direction}"] = (BFAN("equal", 20.0, direction), AvgPool())
        out[f"bfan_prob_{direction}"] = (BFAN("prob", 20.0, direction), AvgPool())
    for kind in ("l2norm", "softmax", "clipped", "no_norm"):  # fast path + fallbacks
        out[f"scan_both_{kind}"] = (SCAN("both", 9.0, kind), MaxPool())
    out["scan_t2i_lambda50_fallback"] = (SCAN("t2i", 50.0), SumPool())
    out["scan_t2i_gpo"] = (SCAN("t2i", 9.0), GPOPool())
    out["chan_t2i"] = (CHAN("t2i"), LSEPool(10.0, rescale=False))
    out["chan_i2t"] = (CHAN("i2t"), AvgPool())
    out["imram_both"] = (IMRAM("both", 3, 9.0, embed_size=12), AvgPool())
    # more steps than the two alternating workspace buffers; renormalised memory
    out["imram_both_5steps"] = (IMRAM("both", 5, 9.0, embed_size=12), AvgPool())
    out["imram_t2i_4steps_renorm"] = (
        IMRAM("t2i", 4, 9.0, renorm_memory=True, embed_size=12),
        LSEPool(6.0),
    )
    out["global_gpo"] = (GlobalAlign(), GPOPool())
    return out


HEADS = _heads()


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("budget_mb", [1e-9, 0.01, 256])
def test_engine_equals_direct(name, budget_mb):
    align, pooling = HEADS[name]
    sim = Similarity(align, pooling).double()
    img, il, cap, cl = _data(seed=len(name))
    with torch.no_grad():
        full = sim(img, il, cap, cl)
    got = sim.score_matrix(img, il, cap, cl, max_block_mb=budget_mb)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["scan_both_lse", "bfan_equal_both", "chan_t2i", "chan_i2t"])
@pytest.mark.parametrize(("n_img", "n_cap"), [(1, 1), (1, 5), (4, 1)])
def test_single_image_single_token(name, n_img, n_cap):
    align, pooling = HEADS[name]
    sim = Similarity(align, pooling).double()
    img, il, cap, cl = _data(seed=3, n_img=n_img, n_cap=n_cap)
    cap, cl = cap[:, :1].contiguous(), torch.ones_like(cl)  # every caption is one token
    with torch.no_grad():
        full = sim(img, il, cap, cl)
    torch.testing.assert_close(sim.score_matrix(img, il, cap, cl), full, rtol=0, atol=1e-12)


def test_chan_t2i_block_product_skips_padded_words(monkeypatch):
    """CHAN t2i multiplies the block's images by its VALID words only (no padded column)."""
    import itm.models.align.chan as chan

    rows = []
    real = chan.block_scores

    def spy(ws, name, ctx, query_t):
        rows.append(query_t.shape[0] * query_t.shape[1])
        return real(ws, name, ctx, query_t)

    monkeypatch.setattr(chan, "block_scores", spy)
    img, il, cap, cl = _data(seed=4, n_cap=30)
    sim = Similarity(CHAN("t2i"), LSEPool(10.0, rescale=False)).double()
    got = sim.score_matrix(img, il, cap, cl)
    assert sum(rows) == int(cl.sum()) and len(set(cl.tolist())) > 1
    with torch.no_grad():
        torch.testing.assert_close(got, sim(img, il, cap, cl), rtol=0, atol=1e-12)


def test_image_blocks_serpentine_reuses_the_transposed_images(monkeypatch):
    """With several image blocks, consecutive caption blocks visit them in opposite orders, so
    the i2t transposed image block is built once per caption block plus once, not once per
    (image, caption) block; the scores still equal the direct result."""
    builds = []
    real = Workspace.memo

    def counting(self, name, key, build):
        return real(self, name, key, lambda: builds.append(name) or build())

    monkeypatch.setattr(Workspace, "memo", counting)
    img, il, cap, cl = _data(seed=8, n_img=10, n_cap=12)
    cl = torch.full_like(cl, 8)  # one block shape for every caption block
    sim = Similarity(SCAN("i2t", 4.0), AvgPool()).double()
    sim.max_caption_block = 3  # 4 caption blocks
    b1, _ = sim.block_sizes(5, 8, 8, 0.02, n_img=10)
    n_img_blocks = -(-10 // b1)
    assert n_img_blocks >= 2
    got = sim.score_matrix(img, il, cap, cl, max_block_mb=0.02)
    n_cap_blocks = 4
    assert len(builds) == n_cap_blocks * (n_img_blocks - 1) + 1
    with torch.no_grad():
        torch.testing.assert_close(got, sim(img, il, cap, cl), rtol=0, atol=1e-12)


def test_padding_values_do_not_matter():
    img, il, cap, cl = _data(seed=5)
    sim = Similarity(SCAN("both"), LSEPool()).double()
    a = sim.score_matrix(img, il, cap, cl)
    img2, cap2 = img.clone(), cap.clone()
    for b, n in enumerate(il):
        img2[b, n:] = -7.0
    for b, n in enumerate(cl):
        cap2[b, n:] = 1e3
    torch.testing.assert_close(sim.score_matrix(img2, il, cap2, cl), a, rtol=0, atol=1e-12)
    assert torch.equal(img, img) and not torch.equal(img, img2)  # inputs untouched


def test_inputs_are_not_modified():
    img, il, cap, cl = _data(seed=6)
    img0, cap0 = img.clone(), cap.clone()
    Similarity(BFAN(), AvgPool()).double().score_matrix(img, il, cap, cl)
    assert torch.equal(img, img0) and torch.equal(cap, cap0)


def test_float32_close_to_float64():
    torch.set_num_threads(1)  # docs/numerics.md: the fp32 trap of this CPU build
    try:
        img, il, cap, cl = _data(seed=7, n_img=9, n_cap=14, d=32)
        for name in ("scan_t2i_lse", "scan_i2t_avg", "bfan_equal_both", "chan_t2i"):
            sim = Similarity(*HEADS[name]).double()
            ref = sim.score_matrix(img, il, cap, cl)
            got = sim.float().score_matrix(img.float(), il, cap.float(), cl)
            assert got.dtype == torch.float32
            if name.startswith("bfan"):
                # the focal selection is a step function: float32 may flip an item that sits
                # at the threshold in the direct path too, so compare with the direct fp32
                with torch.no_grad():
                    ref = sim(img.float(), il, cap.float(), cl).double()
            torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)
    finally:
        torch.set_num_threads(torch.get_num_interop_threads())


def test_workspace_reuses_buffers():
    ws = Workspace()
    like = torch.zeros(1)
    a = ws.get("x", (4, 5), like)
    b = ws.get("x", (2, 3), like)
    assert a.data_ptr() == b.data_ptr() and ws.nbytes == 20 * 4
    ws.get("x", (5, 5), like)
    assert ws.nbytes == 25 * 4


def test_block_sizes_balanced_and_within_budget():
    sim = Similarity(SCAN("t2i"), LSEPool())
    b1, b2 = sim.block_sizes(36, 20, 4, 256, n_img=1000)
    assert b1 * b2 * sim.align.bytes_per_pair(36, 20, 4) <= 256 * 2**20
    n_blocks = -(-1000 // b1)
    assert b2 == 128 and n_blocks * b1 - 1000 < n_blocks  # balanced: no tiny last block


@pytest.mark.parametrize(
    ("name", "fn"),
    [
        ("scan_t2i", lambda i, c, cl, h: baselines.scan_t2i(i, c, cl, 9.0, 6.0)),
        ("scan_i2t", lambda i, c, cl, h: baselines.scan_i2t(i, c, cl, 4.0)),
        ("bfan", lambda i, c, cl, h: baselines.bfan(i, c, cl, 20.0)),
        ("chan", lambda i, c, cl, h: baselines.chan_t2i(i, c, cl, 10.0)),
        ("imram", lambda i, c, cl, h: baselines.imram(i, c, cl, h, 9.0)),
    ],
)
def test_loop_baselines_equal_engine(name, fn):
    heads = {
        "scan_t2i": (SCAN("t2i", 9.0), LSEPool(6.0)),
        "scan_i2t": (SCAN("i2t", 4.0), AvgPool()),
        "bfan": (BFAN("equal", 20.0, "both"), AvgPool()),
        "chan": (CHAN("t2i"), LSEPool(10.0, rescale=False)),
        "imram": (IMRAM("both", 3, 9.0, embed_size=12), AvgPool()),
    }
    torch.manual_seed(1)
    sim = Similarity(*heads[name]).double()
    img, il, cap, cl = _data(seed=11, full_images=True)
    with torch.no_grad():
        ref = fn(img, cap, cl, sim.align)
    torch.testing.assert_close(sim.score_matrix(img, il, cap, cl), ref, rtol=0, atol=1e-10)


def test_workspace_stays_within_budget(monkeypatch):
    """The reused workspace of a whole scoring run stays within the block budget."""
    import itm.models.align.engine as engine

    seen = []

    class Recording(Workspace):
        def get(self, name, shape, like):
            out = super().get(name, shape, like)
            seen.append(self.nbytes)
            return out

    monkeypatch.setattr(engine, "Workspace", Recording)
    img, il, cap, cl = _data(seed=2, n_img=12, n_cap=120, k=36, n_words=20, d=16)
    for head in (SCAN("both"), BFAN(), CHAN()):
        seen.clear()
        Similarity(head, AvgPool()).score_matrix(img.float(), il, cap.float(), cl, 1.0)
        assert 0 < max(seen) <= 1.0 * 2**20, (head, max(seen))


@pytest.mark.slow
def test_peak_rss_within_budget_small():
    """A fresh process scoring 300 x 1500 (d=64) under an 8 MB budget: RSS grows by about the
    output plus the budget, not with the number of pairs (the full tensor would be ~1 GB)."""
    code = (
        f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
        "import bench_scoring as b; print(json.dumps(b.child_rss(300, 1500, 36, 64, 8)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    workspace = res["growth_mb"] - res["output_mb"]
    assert workspace <= 8 * 1.5 + 24, res  # budget (+ slack for allocator / small tensors)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("scale", [1e3, 1e7])
def test_fast_path_does_not_overflow_with_unnormalised_features(direction, scale):
    """Encoders with ``norm: false`` give fragments of any size: at the fast path's largest
    temperature the unnormalised ``w^T G w ~ Z^2 |c|^2`` overflowed float32 (inf, then cosines
    of 0 or 1e22) before the Gram matrices of large sets were scaled by a power of 4."""
    torch.set_num_threads(1)  # docs/numerics.md: the fp32 trap of this CPU build
    try:
        img, il, cap, cl = _data(seed=12, n_img=4, n_cap=6, k=6, n_words=7, d=16)
        img, cap = img * scale, cap * scale
        sim = Similarity(SCAN(direction, 30.0), AvgPool()).double()
        with torch.no_grad():
            ref = sim(img, il, cap, cl)
        got = sim.float().score_matrix(img.float(), il, cap.float(), cl)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)
        for head in (BFAN("equal", 30.0, direction),):  # its own kernel path (select hook)
            ref = Similarity(head, None).double()(img, il, cap, cl)
            got = Similarity(head, None).float().score_matrix(img.float(), il, cap.float(), cl)
            assert torch.isfinite(got).all()
            assert float((got.double() - ref).abs().max()) < 0.5  # focal threshold may flip
    finally:
        torch.set_num_threads(torch.get_num_interop_threads())


def test_gram_scaling_is_exact(monkeypatch):
    """Scaling a large set's Gram matrix by 4^-k and its cosines by 2^-k changes no bit of
    the scores where nothing overflows (fused and tensor kernels alike)."""
    import itm.models.align.engine as engine

    img, il, cap, cl = _data(seed=13, n_img=3, n_cap=5, k=6, n_words=7, d=16)
    img = (img / img.norm(dim=-1, keepdim=True)).float() * 2.0**10  # |c|^2 = 2^20: scaled
    mask = torch.arange(6)[None] < il[:, None]
    assert float(engine.context_gram(img, mask)["gram_scale"].min()) == 2.0**10
    for fused in ("1", "0"):
        monkeypatch.setenv("ITM_FUSED", fused)
        for direction in ("t2i", "i2t"):
            sim = Similarity(SCAN(direction, 9.0), AvgPool())
            scaled = sim.score_matrix(img, il, cap.float() * 2.0**10, cl)
            with monkeypatch.context() as m:
                m.setattr(engine, "GRAM_SCALE_ABOVE", float("inf"))
                plain = sim.score_matrix(img, il, cap.float() * 2.0**10, cl)
            assert torch.equal(scaled, plain), (fused, direction)


@pytest.mark.parametrize("fused", ["1", "0"], ids=["c_kernel", "tensor_kernel"])
@pytest.mark.parametrize("lam", [9.0, 20.0])
def test_fast_softmax_is_bounded_for_unnormalised_fragments(monkeypatch, fused, lam):
    """``norm: false`` encoders: fragment norms ~1e3 give raw region-word scores ~1e6, whose
    ``exp(lambda * s)`` is inf from s ~ 4.4 (lambda 20) in float32. The fast path (the C kernel,
    the tensor kernel with the Gram identity) takes exp only of ``lambda * normed`` with
    ``|normed| <= 1`` (the scores l2-normed across each query set), so it stays finite and
    equals the float64 max-shifted softmax of the reference path; the training path
    (``masked_softmax``, torch's max-shifted softmax) is finite with finite gradients."""
    import itm.models.align.engine as engine

    monkeypatch.setenv("ITM_FUSED", fused)
    torch.set_num_threads(1)  # docs/numerics.md: the fp32 trap of this CPU build
    try:
        img, il, cap, cl = _data(seed=21, n_img=4, n_cap=6, k=6, n_words=7, d=16)
        img = (
            img / img.norm(dim=-1, keepdim=True) * 1e3 * (1 + torch.rand(img.shape[:-1]))[..., None]
        )
        cap = (
            cap / cap.norm(dim=-1, keepdim=True) * 1e3 * (1 + torch.rand(cap.shape[:-1]))[..., None]
        )
        raw = torch.einsum("ikd,cwd->ikcw", img, cap)
        assert float(raw.abs().max()) > 1e5 and torch.isinf(torch.exp(lam * raw.float())).any()
        heads = [SCAN("t2i", lam), SCAN("i2t", lam), SCAN("t2i", lam, feature_norm="l2norm")]
        for head in heads:
            assert engine.fast_softmax_ok(head.feature_norm, lam, torch.float32)
            sim = Similarity(head, AvgPool())
            with torch.no_grad():
                ref = sim.double()(img, il, cap, cl)
            got = sim.float().score_matrix(img.float(), il, cap.float(), cl)
            assert torch.isfinite(got).all(), (head, fused)
            torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)
            # the training path in float32: finite scores and gradients
            i32 = img.float().requires_grad_(True)
            c32 = cap.float().requires_grad_(True)
            out = sim.float()(i32, il, c32, cl)
            out.sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(i32.grad).all()
            assert torch.isfinite(c32.grad).all()
        bfan = Similarity(BFAN("equal", lam, "t2i"), None)  # its own kernel (select hook)
        got = bfan.float().score_matrix(img.float(), il, cap.float(), cl)
        assert torch.isfinite(got).all()
    finally:
        torch.set_num_threads(torch.get_num_interop_threads())
