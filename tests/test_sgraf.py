"""SGRAF (docs/sgraf.md): the authors' fixtures through the public contract, train-mode
semantics against the authors' per-caption loop, chunked training, the combined module, and
the BiGRU's word dropout.

Fixtures ``sgraf_sgr.npz`` / ``sgraf_saf.npz``: Paranioar/SGRAF@a19d1a9 ``EncoderSimilarity`` in
eval mode, d = 8, sim_dim 6, 3 steps, ``VisualSA`` rebuilt with 5 region slots, biases and
BatchNorm statistics randomised, SGR query / key weights x4 (tests/data/fixtures/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import conformance as C
from itm.models import Similarity
from itm.models.align.sgraf import SGRAF
from itm.released.sgraf import HEAD_RENAMES, graph_renames

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "data" / "fixtures"
sys.path.insert(0, str(ROOT / "bench"))
import baselines  # noqa: E402

RENAMES = {a[:-1]: b[:-1] for a, b in HEAD_RENAMES + graph_renames(3)}


def contract_head(module: str, overrides: tuple[str, ...] = (), d: int = 8) -> Similarity:
    """``Similarity`` of ``model/align=sgraf`` composed from the configs (as outside tests do),
    d = 8, sim_dim 6, 5 region slots, float64, eval mode."""
    with C.hydra_config() as compose:
        cfg = compose(
            [
                "model/align=sgraf",
                f"model.align.module={module}",
                f"model.embed_size={d}",
                "model.align.sim_dim=6",
                "model.align.num_region=5",
                *overrides,
            ]
        )
    torch.manual_seed(0)
    return Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling)).double().eval()


def load_fixture(module: str):
    z = np.load(FIXTURES / f"sgraf_{module}.npz")
    sim = contract_head(module)
    own = sim.state_dict()
    state = {}
    for name in z["param_names"]:
        stem, leaf = str(name).rsplit(".", 1)
        target = f"{RENAMES[stem]}.{leaf}"
        (key,) = [k for k in own if k == target or k.endswith("." + target)]
        state[key] = torch.from_numpy(np.asarray(z[str(name)]))
    sim.load_state_dict(state, strict=True)
    return sim, z


def fixture_inputs(z, zero_pad: bool = False):
    cap = z["captions_zero_pad"] if zero_pad else z["captions"]
    return (
        torch.from_numpy(z["images"]),
        torch.from_numpy(z["img_lens"]),
        torch.from_numpy(cap),
        torch.from_numpy(z["cap_lens"]),
    )


@pytest.mark.parametrize("module", ["sgr", "saf"])
def test_fixture_scores_through_the_contract(module):
    sim, z = load_fixture(module)
    img, il, cap, cl = fixture_inputs(z)
    _, _, cap0, _ = fixture_inputs(z, zero_pad=True)
    with torch.no_grad():
        got = sim(img, il, cap, cl)
        zero = sim(img, il, cap0, cl)
    np.testing.assert_allclose(got.numpy(), z["sims"], rtol=0, atol=1e-9)
    assert torch.equal(got, zero)  # garbage padding ignored
    for mb in (1e-6, 256.0):  # block engine, down to one pair per block
        blocks = sim.score_matrix(img, il, cap, cl, max_block_mb=mb)
        np.testing.assert_allclose(blocks.numpy(), z["sims"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("module", ["sgr", "saf"])
def test_fixture_intermediates(module):
    """The graph's nodes before reasoning (node 0 global) and the attended vectors."""
    sim, z = load_fixture(module)
    img, il, cap, cl = fixture_inputs(z)
    im, cm = C._lengths_mask(tuple(il.tolist()), 5), C._lengths_mask(tuple(cl.tolist()), 6)
    with torch.no_grad():
        nodes, att = sim.align.similarity_vectors(img, im, cap, cm)
    ok = ~np.isnan(z["sim_emb"])
    np.testing.assert_allclose(nodes.numpy()[ok], z["sim_emb"][ok], rtol=0, atol=1e-9)
    ok = ~np.isnan(z["context"])
    np.testing.assert_allclose(att.numpy()[ok], z["context"][ok], rtol=0, atol=1e-9)


def test_node_zero_is_the_read_out():
    """With the fixture's scaled edge weights the nodes differ after 3 steps, so reading out
    another node than 0 gives other scores (the fixture would catch it)."""
    sim, z = load_fixture("sgr")
    nodes = torch.from_numpy(z["sgr_nodes"][-1])  # [img, cap, node, m] after the last step
    head = sim.align
    other = torch.sigmoid(head.sim_eval(torch.nan_to_num(nodes[:, :, 1]))).squeeze(-1)
    assert float((other.detach() - torch.from_numpy(z["sims"])).abs().max()) > 1e-4


def _train_inputs(seed: int = 0, n_img: int = 4, n_cap: int = 5, k: int = 5, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, k, d, generator=g, dtype=torch.float64)
    cap = torch.randn(n_cap, 6, d, generator=g, dtype=torch.float64)
    img, cap = img / img.norm(dim=-1, keepdim=True), cap / cap.norm(dim=-1, keepdim=True)
    cl = torch.tensor([6, 3, 5, 2, 1][:n_cap])
    pad = ~C._lengths_mask(tuple(cl.tolist()), 6)
    cap[pad] = 29.0  # garbage
    return img, torch.full((n_img,), k), cap, cl


@pytest.mark.parametrize("module", ["sgr", "saf"])
def test_train_mode_equals_the_authors_loop(module):
    """Train mode (no dropout): batch BatchNorm statistics over all images for the image
    self-attention, SAF's per caption with one running update per caption in order; scores and
    every running statistic equal the authors' per-caption loop (their modules called as
    modules), and so do the gradients."""
    sim, _ = load_fixture(module)
    sim.align.img_global.drop.p = sim.align.txt_global.drop.p = 0.0
    ref = SGRAF(module, embed_size=8, sim_dim=6, num_region=5, dropout=0.0).double()
    ref.load_state_dict(sim.align.state_dict())
    sim.train()
    ref.train()
    img, il, cap, cl = _train_inputs()
    x, y = img.clone().requires_grad_(True), cap.clone().requires_grad_(True)
    got = sim(x, il, y, cl)
    x2, y2 = img.clone().requires_grad_(True), cap.clone().requires_grad_(True)
    want = baselines.sgraf(x2, y2, cl, ref)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(sim.align.state_dict()[key], value, rtol=0, atol=1e-12)
    weights = torch.linspace(0.5, 1.5, got.numel(), dtype=got.dtype).view_as(got)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-10)
    valid = C._lengths_mask(tuple(cl.tolist()), 6)
    torch.testing.assert_close(y.grad[valid], y2.grad[valid], rtol=0, atol=1e-10)
    # and train mode differs from eval mode (batch statistics, not running ones)
    sim.eval()
    with torch.no_grad():
        assert float((sim(img, il, cap, cl) - got.detach()).abs().max()) > 1e-6


def test_saf_running_statistics_by_hand():
    """A hand-checked case: SAF's BatchNorm(1) sees caption j's logits over all images x its
    valid nodes; after the call running_mean = 0.9^B2 r0 + sum_j 0.1 * 0.9^(B2-1-j) mean_j."""
    sim, _ = load_fixture("saf")
    head = sim.align
    bn = head.saf.bn
    r0, v0, t0 = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    img, il, cap, cl = _train_inputs(seed=2)
    im, cm = C._lengths_mask((5,) * 4, 5), C._lengths_mask(tuple(cl.tolist()), 6)
    with torch.no_grad():
        nodes, _ = head.similarity_vectors(img, im, cap, cm)  # eval: the same nodes
        z = head.saf.attn(nodes).squeeze(-1)  # [B1, B2, N]
    sim.train()
    head.img_global.drop.p = head.txt_global.drop.p = 0.0
    # img_global BNs would use batch stats in train: compare the SAF statistics only
    head.img_global.eval()
    with torch.no_grad():
        sim(img, il, cap, cl)
    rm, rv = r0.clone(), v0.clone()
    for j, n in enumerate(cl.tolist()):
        vals = z[:, j, : n + 1].reshape(-1)
        rm = 0.9 * rm + 0.1 * vals.mean()
        rv = 0.9 * rv + 0.1 * vals.var(unbiased=True)
    torch.testing.assert_close(bn.running_mean, rm, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, rv, rtol=0, atol=1e-12)
    assert int(bn.num_batches_tracked) == t0 + len(cl)


@pytest.mark.parametrize("module", ["sgr", "saf"])
def test_chunked_training_equals_one_call(module):
    """The training forward scored in checkpointed chunks of captions gives the same scores,
    gradients and running statistics as one call (dropout included: same seed)."""
    outs = []
    for mb in (0.0, 1e-6):  # 1e-6 MB: one caption per chunk
        sim = contract_head(module, (f"model.align.train_block_mb={mb}",)).train()
        img, il, cap, cl = _train_inputs(seed=4)
        x, y = img.clone().requires_grad_(True), cap.clone().requires_grad_(True)
        torch.manual_seed(7)
        scores = sim(x, il, y, cl)
        (scores * torch.arange(scores.numel()).view_as(scores)).sum().backward()
        grads = [p.grad.clone() for p in sim.parameters()]
        outs.append((scores.detach(), x.grad, y.grad, grads, sim.state_dict()))
    (s0, x0, y0, g0, st0), (s1, x1, y1, g1, st1) = outs
    torch.testing.assert_close(s1, s0, rtol=0, atol=1e-12)
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-10)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for key in st0:
        torch.testing.assert_close(st1[key], st0[key], rtol=0, atol=1e-12)


def test_dropout_acts_in_training_only():
    sim = contract_head("sgr").train()
    img, il, cap, cl = _train_inputs(seed=5)
    with torch.no_grad():
        torch.manual_seed(1)
        a = sim(img, il, cap, cl)
        torch.manual_seed(2)
        b = sim(img, il, cap, cl)
    assert float((a - b).abs().max()) > 1e-6
    sim.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        c = sim(img, il, cap, cl)
        torch.manual_seed(2)
        assert torch.equal(c, sim(img, il, cap, cl))


def test_sgraf_module_is_the_mean_of_its_two_heads():
    sim = contract_head("sgraf")
    names = set(sim.state_dict())
    assert "align.sgr_head.sgr.2.query.weight" in names
    assert "align.saf_head.saf.bn.running_var" in names
    assert "align.sgr_head.img_global.local_bn.running_mean" in names
    img, il, cap, cl = _train_inputs(seed=6)
    head = sim.align
    im, cm = C._lengths_mask((5,) * 4, 5), C._lengths_mask(tuple(cl.tolist()), 6)
    with torch.no_grad():
        want = (head.sgr_head(img, im, cap, cm) + head.saf_head(img, im, cap, cm)) / 2
        torch.testing.assert_close(sim(img, il, cap, cl), want, rtol=0, atol=1e-15)
        torch.testing.assert_close(
            sim.score_matrix(img, il, cap, cl, max_block_mb=1e-3), want, rtol=0, atol=1e-12
        )


def test_engine_equals_the_authors_loop_at_a_larger_size():
    """Eval mode, float32, 36 region slots, ragged captions: the engine matches the loop."""
    torch.manual_seed(0)
    head = SGRAF("sgr", embed_size=32, sim_dim=16).eval()
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 36, 32, generator=g), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(16, 12, 32, generator=g), dim=-1)
    cl = torch.randint(1, 13, (16,), generator=g)
    sim = Similarity(head, None)
    with torch.no_grad():
        want = baselines.sgraf(img, cap, cl, head)
    got = sim.score_matrix(img, torch.full((5,), 36), cap, cl, max_block_mb=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("module", ["sgr", "saf"])
def test_block_path_on_unsorted_captions(module):
    """The inference block (packed valid words in runs of equal length) on a caption block in
    no length order, with equal lengths, a one-word caption and padded regions, equals the
    reference forward (float64) column by column; garbage in padded slots changes nothing."""
    from itm.models.align.base import Block
    from itm.models.align.engine import Workspace

    head = contract_head(module).align
    g = torch.Generator().manual_seed(11)
    img = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    cap = torch.randn(6, 6, 8, generator=g, dtype=torch.float64)
    im = C._lengths_mask((5, 3, 4), 5)
    cm = C._lengths_mask((2, 6, 1, 2, 4, 6), 6)
    with torch.no_grad():
        want = head(img, im, cap, cm)
        img_z, cap_z = img.masked_fill(~im[..., None], 0.0), cap.masked_fill(~cm[..., None], 0.0)
        images = Block(img_z, im, head.prepare_images(img_z, im), (0, 3))
        captions = Block(cap_z, cm, head.prepare_captions(cap_z, cm), 0)
        got = head.score_block(images, captions, None, Workspace())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    cap_g = cap_z.masked_fill(~cm[..., None], 7.0)  # garbage in the padded word slots
    with torch.no_grad():
        again = head.score_block(images, Block(cap_g, cm, captions.cache, 0), None, Workspace())
    torch.testing.assert_close(again, got, rtol=0, atol=1e-12)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="module"):
        SGRAF("ave")
    head = SGRAF("saf", embed_size=8, sim_dim=6, num_region=4).double().eval()
    img = torch.randn(2, 5, 8, dtype=torch.float64)
    cap = torch.randn(2, 3, 8, dtype=torch.float64)
    ones = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="num_region"):
        head(img, ones, cap, torch.ones(2, 3, dtype=torch.bool))


def test_the_pooling_group_is_ignored():
    with C.hydra_config() as compose:
        cfg = compose(["model/align=sgraf", "model.embed_size=8", "pooling=lse"])
    sim = Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling))
    assert sim.pooling is None


def test_bigru_word_dropout():
    from itm.models.encoders import BiGRUTextEncoder

    torch.manual_seed(0)
    enc = BiGRUTextEncoder(vocab_size=20, word_dim=8, embed_size=8, dropout=0.4)
    tokens = torch.randint(4, 20, (3, 5))
    lens = torch.tensor([5, 3, 2])
    enc.eval()
    assert torch.equal(enc(tokens, lens), enc(tokens, lens))
    enc.train()
    torch.manual_seed(1)
    a = enc(tokens, lens)
    torch.manual_seed(2)
    with torch.no_grad():
        assert float((a - enc(tokens, lens)).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="dropout"):
        BiGRUTextEncoder(vocab_size=20, dropout=1.0)


def test_bench_floor_counts():
    """The bench's floor (bench/bench_sgraf.py) and the spec's count at the paper's sizes
    (K=36, n=14, d=1024, m=256, 3 steps): methods.md section 10 states 28.3 / 9.9 MFLOP."""
    import bench_sgraf

    lens = torch.tensor([14])
    assert bench_sgraf.spec_flops("sgr", 36, 1024, 256, 3) / 1e6 == pytest.approx(28.3, abs=0.05)
    assert bench_sgraf.spec_flops("saf", 36, 1024, 256, 3) / 1e6 == pytest.approx(9.9, abs=0.05)
    ours = bench_sgraf.floor_flops("sgr", 36, 1024, 256, 3, lens)
    assert ours / 1e6 == pytest.approx(18.5, abs=0.05)
    assert bench_sgraf.floor_flops("saf", 36, 1024, 256, 3, lens) / 1e6 == pytest.approx(
        9.9, abs=0.1
    )


@pytest.mark.slow
def test_bench_quick_runs():
    import subprocess

    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_sgraf.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert "x floor" in out and "training step" in out


def test_alignment_picture_for_viz():
    """``alignment`` (W&B, the notebook via itm.viz) = each word's t2i attention over the
    regions, rows summing to 1; for ``sgraf`` the same picture."""
    from itm.models.align.attention import pair_scores, t2i_weights
    from itm.viz import attention_from_embeddings

    g = torch.Generator().manual_seed(8)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    for module in ("sgr", "sgraf"):
        head = contract_head(module).align.float()
        pic = attention_from_embeddings(head, img, cap)
        s, a, b = pair_scores(img, cap)
        want = t2i_weights(s, a, b, "clipped_l2norm", 9.0)[0, :, 0].T
        np.testing.assert_allclose(pic, want.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(pic.sum(1), 1.0, atol=1e-6)
