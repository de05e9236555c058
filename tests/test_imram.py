"""IMRAM against the authors' fixture, a naive per-pair reference, padding garbage, gradients,
block-wise scoring and the Hydra node."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import load_fixture
from itm.models import Similarity
from itm.models.align.imram import IMRAM, MemoryDistillationUnit
from itm.models.pooling import AvgPool, LSEPool, MaxPool, SumPool
from itm.models.similarity import lengths_to_mask
from reference import attend, cosine, pool, random_sets

POOLS = {"avg": AvgPool, "max": MaxPool, "sum": SumPool, "lse": lambda: LSEPool(6.0)}
BRANCHES = ("t2i", "i2t")


def _t(x):
    return torch.as_tensor(np.asarray(x))


def _steps(head, img, il, cap, cl, pooling):
    """``head.step_scores`` from lengths (as ``Similarity`` would call the head)."""
    img, cap = _t(img), _t(cap)
    img_mask = lengths_to_mask(_t(il), img.shape[1])
    cap_mask = lengths_to_mask(_t(cl), cap.shape[1])
    return head.step_scores(img, img_mask, cap, cap_mask, pooling)


def _fixture_head(f, direction):
    """A head holding the fixture's MDU weights (candidate <- linear_*, gate <- gate_*)."""
    head = IMRAM(direction, steps=3, lambda_softmax=9.0, renorm_memory=False, embed_size=8)
    state = {}
    for branch in BRANCHES:
        if direction in (branch, "both"):
            for p in ("weight", "bias"):
                state[f"mdu_{branch}.candidate.{p}"] = _t(f[f"linear_{branch}.{p}"])
                state[f"mdu_{branch}.gate.{p}"] = _t(f[f"gate_{branch}.{p}"])
    head.load_state_dict(state)  # strict: exactly the branch's parameters
    return head


# --- the authors' fixture (float32) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "key"), [("t2i", "sims_text"), ("i2t", "sims_image"), ("both", "sims_full")]
)
@pytest.mark.parametrize("padding", ["garbage", "zeros"])
def test_fixture(direction, key, padding):
    f = load_fixture("imram_sim_k3_nonorm")
    assert f["images"].dtype == np.float32 and int(f["iteration_step"]) == 3
    cap = f["captions"].copy()
    if padding == "zeros":
        for j, n in enumerate(f["cap_lens"]):
            cap[j, n:] = 0
    head = _fixture_head(f, direction)
    img, cap, cl = _t(f["images"]), _t(cap), _t(f["cap_lens"])
    il = torch.full((img.shape[0],), img.shape[1])
    sim = Similarity(head, AvgPool())
    with torch.no_grad():
        got = sim(img, il, cap, cl)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), f[key], rtol=0, atol=1e-5)
        steps = _steps(head, img, il, cap, cl, AvgPool())
        assert set(steps) == ({"t2i", "i2t"} if direction == "both" else {direction})
        for branch, per_step in steps.items():
            assert per_step.shape == (3, 3, 4)
            ref = f[f"sims_{branch}_steps"]
            np.testing.assert_allclose(per_step.numpy(), ref, rtol=0, atol=1e-5)
        # train mode gives the same matrix, never transposed
        torch.testing.assert_close(sim.train()(img, il, cap, cl), got, rtol=0, atol=0)
        torch.testing.assert_close(
            sim.score_matrix(img, il, cap, cl, max_block_mb=1e-9), got, rtol=0, atol=1e-6
        )


def test_fixture_with_garbage_regions():
    """Three more region slots of garbage (img_lens = 5 of 8) change nothing."""
    f = load_fixture("imram_sim_k3_nonorm")
    rng = np.random.default_rng(1)
    extra = (rng.standard_normal((3, 3, 8)) * 5).astype(np.float32)
    img = np.concatenate([f["images"], extra], axis=1)
    sim = Similarity(_fixture_head(f, "both"), AvgPool())
    with torch.no_grad():
        got = sim(_t(img), torch.full((3,), 5), _t(f["captions"]), _t(f["cap_lens"]))
    np.testing.assert_allclose(got.numpy(), f["sims_full"], rtol=0, atol=1e-5)


# --- a naive per-pair reference (float64) ----------------------------------------------------


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _mdu_numpy(mdu, q, att):
    """The MDU written out with an explicit concatenation [query ; attended]."""
    w = {n: p.detach().numpy() for n, p in mdu.named_parameters()}
    z = np.concatenate([q, att], axis=-1)
    g = _sigmoid(z @ w["gate.weight"].T + w["gate.bias"])
    cand = np.tanh(z @ w["candidate.weight"].T + w["candidate.bias"])
    return g * q + (1 - g) * cand


def imram_reference(head, img, il, cap, cl, pooling="avg"):
    """{branch: [steps, n_img, n_cap]} by a loop over pairs, valid fragments sliced out."""
    out = {}
    for branch in BRANCHES:
        if head.direction not in (branch, "both"):
            continue
        mdu = getattr(head, f"mdu_{branch}")
        sims = np.zeros((head.steps, len(img), len(cap)))
        for i in range(len(img)):
            v = img[i, : il[i]]
            for j in range(len(cap)):
                e = cap[j, : cl[j]]
                query, context = (e, v) if branch == "t2i" else (v, e)
                memory = query
                for k in range(head.steps):
                    _, att = attend(memory, context, "clipped_l2norm", head.lambda_softmax)
                    sims[k, i, j] = pool(cosine(query, att), pooling)
                    memory = _mdu_numpy(mdu, memory, att)
                    if head.renorm_memory:
                        memory = memory / (np.linalg.norm(memory, axis=-1, keepdims=True) + 1e-8)
        out[branch] = sims
    return out


def _random_head(direction, steps, renorm=False, d=16, seed=0, scale=3.0):
    """float64 head with MDU weights large enough that gates and candidates matter."""
    torch.manual_seed(seed)
    head = IMRAM(direction, steps=steps, lambda_softmax=5.0, renorm_memory=renorm, embed_size=d)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(scale)
    return head.double()


def _data(seed, il, cl, k, n_words, d=16, garbage=True):
    rng = np.random.default_rng(seed)
    img = random_sets(rng, len(il), k, d, il, garbage)
    cap = random_sets(rng, len(cl), n_words, d, cl, garbage)
    return img, np.asarray(il), cap, np.asarray(cl)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("renorm", [False, True])
def test_against_naive_reference(direction, steps, renorm):
    img, il, cap, cl = _data(7, [4, 1, 6], [5, 1, 3, 7, 2], k=6, n_words=7)
    head = _random_head(direction, steps, renorm)
    ref = imram_reference(head, img, il, cap, cl)
    got = _steps(head, img, il, cap, cl, AvgPool())
    assert set(got) == set(ref)
    for branch in ref:
        np.testing.assert_allclose(got[branch].detach().numpy(), ref[branch], rtol=0, atol=1e-10)
    total = Similarity(head, AvgPool())(_t(img), _t(il), _t(cap), _t(cl))
    expected = sum(r.sum(axis=0) for r in ref.values())
    np.testing.assert_allclose(total.detach().numpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("pooling", ["max", "lse", "sum"])
def test_pooling_module_pools_each_step(pooling):
    img, il, cap, cl = _data(11, [3, 5], [1, 4, 6], k=5, n_words=6)
    head = _random_head("both", 2)
    ref = imram_reference(head, img, il, cap, cl, pooling)
    got = Similarity(head, POOLS[pooling]())(_t(img), _t(il), _t(cap), _t(cl))
    expected = ref["t2i"].sum(0) + ref["i2t"].sum(0)
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=0, atol=1e-10)


def test_hand_computed_one_step():
    """One step, one word against two orthogonal regions: attention is uniform (each region's
    clipped-l2-normed score is ~1), att = (v1 + v2)/2, cos = 0.7 / sqrt(0.5); the MDU plays no
    part in a one-step score."""
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    cap = torch.tensor([[[0.6, 0.8]]], dtype=torch.float64)
    head = IMRAM("t2i", steps=1, embed_size=2).double()
    out = Similarity(head, AvgPool())(img, torch.tensor([2]), cap, torch.tensor([1]))
    assert abs(float(out) - 0.7 / 0.5**0.5) < 1e-6


# --- padding, gradients, stability -----------------------------------------------------------


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("renorm", [False, True])
def test_garbage_equals_zero_padding(direction, renorm):
    il, cl = [3, 6, 1], [1, 4, 7]
    img, il, cap, cl = _data(3, il, cl, k=6, n_words=7)
    zeros = [img.copy(), cap.copy()]
    for x, lens in zip(zeros, (il, cl), strict=True):
        for b, n in enumerate(lens):
            x[b, n:] = 0
    sim = Similarity(_random_head(direction, 3, renorm), AvgPool())
    a = sim(_t(img), _t(il), _t(cap), _t(cl))
    b = sim(_t(zeros[0]), _t(il), _t(zeros[1]), _t(cl))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # also the same as trimming every set to its valid part, one pair at a time
    for i, n_reg in enumerate(il):
        for j, n_words in enumerate(cl):
            one = sim(
                _t(img[i : i + 1, :n_reg]),
                _t(il[i : i + 1]),
                _t(cap[j : j + 1, :n_words]),
                _t(cl[j : j + 1]),
            )
            torch.testing.assert_close(one[0, 0], a[i, j], rtol=0, atol=1e-12)


@pytest.mark.parametrize("garbage", [True, False])
@pytest.mark.parametrize("renorm", [False, True])
def test_gradients_finite_and_zero_into_padding(garbage, renorm):
    il, cl = [2, 5, 1], [1, 3, 6]
    img, il, cap, cl = _data(5, il, cl, k=5, n_words=6, d=8, garbage=garbage)
    img, cap = _t(img).requires_grad_(True), _t(cap).requires_grad_(True)
    head = _random_head("both", 3, renorm, d=8)
    out = Similarity(head, LSEPool(6.0))(img, _t(il), cap, _t(cl))
    out.sum().backward()
    for x, lens in ((img, il), (cap, cl)):
        assert torch.isfinite(x.grad).all()
        for b, n in enumerate(lens):
            assert torch.all(x.grad[b, n:] == 0), "padding must receive no gradient"
        assert x.grad.abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("renorm", [False, True])
def test_many_steps_stay_finite(renorm):
    img, il, cap, cl = _data(9, [4, 1], [1, 5, 3], k=4, n_words=5, d=8)
    img, cap = _t(img).float().requires_grad_(True), _t(cap).float().requires_grad_(True)
    head = IMRAM("both", steps=10, renorm_memory=renorm, embed_size=8)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(10.0)  # saturated gates and candidates
    out = Similarity(head, AvgPool())(img, _t(il), cap, _t(cl))
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 2 * 10 + 1e-4  # each step's cosine mean lies in [-1, 1]
    out.sum().backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(cap.grad).all()
    for p in head.parameters():
        assert torch.isfinite(p.grad).all()


def test_train_and_eval_mode_agree():
    img, il, cap, cl = _data(0, [4, 2], [5, 1, 3], k=4, n_words=5)
    sim = Similarity(_random_head("both", 3), AvgPool())
    args = (_t(img), _t(il), _t(cap), _t(cl))
    torch.testing.assert_close(sim.train()(*args), sim.eval()(*args), rtol=0, atol=0)


# --- block-wise scoring ----------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("budget_mb", [1e-9, 0.02, 256])
def test_score_matrix_equals_forward(direction, budget_mb):
    rng = np.random.default_rng(2)
    il = rng.integers(1, 6, 4)
    cl = rng.integers(1, 9, 6)
    cl[0] = 1  # a one-token caption
    il[1] = 1  # a one-region image
    img, il, cap, cl = _data(2, il, cl, k=5, n_words=8)
    sim = Similarity(_random_head(direction, 3), AvgPool())
    args = (_t(img), _t(il), _t(cap), _t(cl))
    with torch.no_grad():
        full = sim(*args)
    torch.testing.assert_close(
        sim.score_matrix(*args, max_block_mb=budget_mb), full, atol=1e-12, rtol=0
    )


@pytest.mark.parametrize(("n_img", "n_cap"), [(1, 1), (1, 4), (3, 1)])
def test_score_matrix_single_image_and_token(n_img, n_cap):
    img, il, cap, cl = _data(4, [3, 1, 5][:n_img], [1, 6, 2, 4][:n_cap], k=5, n_words=6)
    sim = Similarity(_random_head("both", 3), AvgPool())
    args = (_t(img), _t(il), _t(cap), _t(cl))
    sizes = []
    got = sim.score_matrix(*args, max_block_mb=1e-9, progress=sizes.append)
    assert sizes == [1] * (n_img * n_cap)
    with torch.no_grad():
        torch.testing.assert_close(got, sim(*args), rtol=0, atol=1e-12)


def test_block_sizes_follow_budget():
    """bytes_per_pair counts the materialised [fragments, d] buffers."""
    d = 1024
    both, t2i = IMRAM("both", embed_size=d), IMRAM("t2i", embed_size=d)
    k, n, elem = 36, 20, 4
    assert both.bytes_per_pair(k, n, elem) >= 3 * (k + n) * d * elem + 3 * k * n * elem
    assert t2i.bytes_per_pair(k, n, elem) >= 3 * n * d * elem
    assert t2i.bytes_per_pair(k, n, elem) < both.bytes_per_pair(k, n, elem)
    sim = Similarity(both, AvgPool())
    b1, b2 = sim.block_sizes(k, n, elem, 256, n_img=10_000)
    assert b1 * b2 * both.bytes_per_pair(k, n, elem) <= 256 * 2**20


# --- the MDU ---------------------------------------------------------------------------------


def test_mdu_matches_concatenated_formula_and_broadcasts():
    torch.manual_seed(0)
    mdu = MemoryDistillationUnit(6).double()
    q = torch.randn(4, 5, 6, dtype=torch.float64)  # one caption's words per caption
    att = torch.randn(3, 4, 5, 6, dtype=torch.float64)  # per (image, caption) pair
    got = mdu(q, att)
    assert got.shape == (3, 4, 5, 6)
    expected = _mdu_numpy(mdu, np.broadcast_to(q.numpy(), att.shape), att.numpy())
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=0, atol=1e-12)
    assert [n for n, _ in mdu.named_parameters()] == [
        "gate.weight",
        "gate.bias",
        "candidate.weight",
        "candidate.bias",
    ]
    assert mdu.gate.weight.shape == (6, 12) and mdu.candidate.bias.shape == (6,)


# --- Hydra node and options ------------------------------------------------------------------


def _module_names(head):
    return sorted({name.rsplit(".", 1)[0] for name, _ in head.named_parameters()})


def test_config_node(compose):
    cfg = compose(["model/align=imram", "pooling=avg"])
    node = cfg.model.align
    assert node._target_ == "itm.models.align.imram.IMRAM"
    assert {k: node[k] for k in node if k != "_target_"} == {
        "direction": "both",
        "steps": 3,
        "lambda_softmax": 9.0,
        "renorm_memory": False,
        "embed_size": cfg.model.embed_size,
    }
    sim = Similarity(instantiate(node), instantiate(cfg.model.pooling))
    head = sim.align
    assert isinstance(head, IMRAM) and head.embed_size == 1024
    assert _module_names(head) == [
        "mdu_i2t.candidate",
        "mdu_i2t.gate",
        "mdu_t2i.candidate",
        "mdu_t2i.gate",
    ]
    assert head.mdu_t2i.gate.weight.shape == (1024, 2048)
    names = {n for n, _ in sim.named_parameters()}
    assert "align.mdu_t2i.gate.weight" in names and "align.mdu_i2t.candidate.bias" in names


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_single_direction_holds_only_its_branch(compose, direction):
    cfg = compose(
        ["model/align=imram", f"model.align.direction={direction}", "model.embed_size=16"]
    )
    head = instantiate(cfg.model.align)
    assert head.embed_size == 16
    assert _module_names(head) == [f"mdu_{direction}.candidate", f"mdu_{direction}.gate"]
    assert set(head.state_dict()) == {
        f"mdu_{direction}.{m}.{p}" for m in ("gate", "candidate") for p in ("weight", "bias")
    }


def test_bad_options_raise():
    with pytest.raises(ValueError, match="direction"):
        IMRAM("sideways")
    with pytest.raises(ValueError, match="steps"):
        IMRAM(steps=0)
    with pytest.raises(ValueError, match="feature_norm"):
        IMRAM(feature_norm="l1norm", embed_size=4)
    head = IMRAM("t2i", embed_size=4)
    img, il, cap, cl = _data(0, [2], [2], k=2, n_words=2, d=8)
    with pytest.raises(ValueError, match="embed_size"):
        Similarity(head.double(), AvgPool())(_t(img), _t(il), _t(cap), _t(cl))
