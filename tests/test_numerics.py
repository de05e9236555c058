"""Numerical edge cases of every pooling and every alignment head: empty and one-item sets,
1-image / 1-token blocks, extreme temperatures, half precision, autocast, many IMRAM steps,
BFAN's empty focal set, and bf16-mixed training on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from itm.models import Similarity
from itm.models.pooling import AvgPool, GPOPool, LSEPool, MaxPool, SumPool, pool_scores

D = 16

POOLS = {
    "avg": AvgPool,
    "sum": SumPool,
    "max": MaxPool,
    "lse": lambda: LSEPool(6.0),
    "lse20": lambda: LSEPool(20.0),
    "lse_norescale": lambda: LSEPool(10.0, rescale=False),
    "gpo": GPOPool,
}

# every head (with its directions / variants) and the pooling it is run with
HEADS = {
    "scan_t2i": ("itm.models.align.SCAN", {"direction": "t2i"}, "lse"),
    "scan_i2t": ("itm.models.align.SCAN", {"direction": "i2t"}, "avg"),
    "scan_both": ("itm.models.align.SCAN", {"direction": "both"}, "lse20"),
    "scan_softmax": ("itm.models.align.SCAN", {"feature_norm": "softmax"}, "max"),
    "bfan_equal": ("itm.models.align.bfan.BFAN", {"focal": "equal"}, "avg"),
    "bfan_prob": ("itm.models.align.bfan.BFAN", {"focal": "prob"}, "avg"),
    "chan": ("itm.models.align.chan.CHAN", {}, "lse_norescale"),
    "chan_i2t": ("itm.models.align.chan.CHAN", {"direction": "i2t"}, "avg"),
    "imram": ("itm.models.align.imram.IMRAM", {"embed_size": D, "steps": 3}, "avg"),
    "global": ("itm.models.align.vse_infinity.GlobalAlign", {}, "gpo"),
}


def make_sim(head: str, dtype=torch.float32, **overrides) -> Similarity:
    from hydra.utils import instantiate

    target, kwargs, pool = HEADS[head]
    torch.manual_seed(0)
    sim = Similarity(instantiate({"_target_": target, **kwargs, **overrides}), POOLS[pool]())
    return sim.to(dtype)


def l2n(x):
    return x / x.norm(dim=-1, keepdim=True)


def lse64(x: torch.Tensor, lam: float, rescale: bool = True) -> torch.Tensor:
    out = torch.logsumexp(x.double() * lam, dim=-1)
    return out / lam if rescale else out


# --- pooling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 30.0, 3000.0])
def test_lse_lambda20_half_precision_matches_float64(dtype, scale):
    """lambda 20 on half inputs: lambda * x reaches 6e4 (fp16's limit) at scale 3000; the result
    is finite and equals the float64 value of the same (rounded) inputs to the output's
    rounding."""
    torch.manual_seed(1)
    x = (torch.rand(64, 36) * 2 - 1).mul(scale).to(dtype)
    mask = torch.rand(64, 36) < 0.7
    mask[:, 0] = True
    out = pool_scores(LSEPool(20.0), x, mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = lse64(x.double().masked_fill(~mask, float("-inf")), 20.0)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref, rtol=eps, atol=eps * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lse_half_keeps_small_terms(dtype):
    """36 equal items: the log(36)/lambda bonus must survive (a half-precision sum of 36 exp
    terms would be off by several ulps)."""
    x = torch.full((1, 36), 0.5, dtype=dtype)
    out = pool_scores(LSEPool(20.0), x, torch.ones(1, 36, dtype=torch.bool))
    assert float(out) == pytest.approx(0.5 + math.log(36) / 20, abs=2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("name", sorted(POOLS))
def test_empty_set_pools_to_zero_with_finite_gradient(name):
    pool = POOLS[name]()
    x = torch.randn(3, 5, D, requires_grad=True)
    mask = torch.tensor([[True] * 5, [False] * 5, [True, False, False, False, False]])
    out = pool(x, mask)
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[1] == 0)
    # a zero-length set axis
    empty = pool(torch.randn(2, 0, D), torch.zeros(2, 0, dtype=torch.bool))
    assert empty.shape == (2, D) and torch.all(empty == 0)


@pytest.mark.parametrize("name", ["avg", "max", "lse", "lse20", "gpo"])
def test_single_item_set_is_the_item(name):
    pool = POOLS[name]()
    x = torch.randn(4, 1, D, dtype=torch.float64)
    with torch.no_grad():
        out = pool.double()(x, torch.ones(4, 1, dtype=torch.bool))
    torch.testing.assert_close(out, x[:, 0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(POOLS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_finite_and_close(name, dtype):
    torch.manual_seed(2)
    pool = POOLS[name]()
    x = torch.rand(8, 36, D) * 2 - 1
    mask = torch.rand(8, 36) < 0.8
    mask[:, 0] = True
    with torch.no_grad():
        ref = pool(x.to(dtype).float(), mask)
        module = pool.to(dtype) if name == "gpo" else pool  # GPO's own weights in half too
        out = module(x.to(dtype), mask)
    assert out.dtype == dtype and torch.isfinite(out).all()
    scale = max(1.0, float(ref.abs().max()))
    tol = 8 * torch.finfo(dtype).eps * scale
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("name", sorted(POOLS))
def test_large_magnitudes_finite(name):
    pool = POOLS[name]()
    x = torch.tensor([[[1e4], [-1e4], [3e3]]])
    with torch.no_grad():
        out = pool(x, torch.ones(1, 3, dtype=torch.bool))
    assert torch.isfinite(out).all()


# --- heads ---------------------------------------------------------------------------------------


def _inputs(b1, k, b2, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = l2n(torch.randn(b1, k, D, generator=g)).to(dtype)
    cap = l2n(torch.randn(b2, n, D, generator=g)).to(dtype)
    img_lens = torch.randint(1, k + 1, (b1,), generator=g)
    cap_lens = torch.randint(1, n + 1, (b2,), generator=g)
    return img, img_lens, cap, cap_lens


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 5, 3, 1), (3, 1, 1, 4), (2, 4, 3, 6)], ids=str)
def test_tiny_blocks_finite_and_engine_agrees(head, shape):
    """1 image / 1 region / 1 caption / 1 word: forward and block-wise scoring are finite,
    agree, and gradients are finite."""
    sim = make_sim(head)
    img, img_lens, cap, cap_lens = _inputs(*shape)
    img.requires_grad_(True)
    cap.requires_grad_(True)
    out = sim(img, img_lens, cap, cap_lens)
    assert out.shape == (shape[0], shape[2]) and torch.isfinite(out).all(), out
    out.sum().backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(cap.grad).all()
    with torch.no_grad():
        blocks = sim.score_matrix(img.detach(), img_lens, cap.detach(), cap_lens, max_block_mb=1)
    assert torch.isfinite(blocks).all()
    # the engine equals forward (compared in float64, as the public contract is tested)
    sim64 = make_sim(head, torch.float64)
    img64, cap64 = img.detach().double(), cap.detach().double()
    with torch.no_grad():
        ref = sim64(img64, img_lens, cap64, cap_lens)
        blocks = sim64.score_matrix(img64, img_lens, cap64, cap_lens, max_block_mb=1)
    torch.testing.assert_close(blocks, ref, atol=1e-9, rtol=1e-9)


def test_bfan_prob_float32_ties_engine_equals_forward():
    """Tied weights (a 1-word caption in t2i: every region scores +-1) sit on the focal
    threshold F = 0; rounding must not decide keep/drop differently in the two paths."""
    sim = make_sim("bfan_prob", direction="t2i")
    img, img_lens, cap, cap_lens = _inputs(1, 5, 3, 1)
    with torch.no_grad():
        out = sim(img, img_lens, cap, cap_lens)
        blocks = sim.score_matrix(img, img_lens, cap, cap_lens)
    torch.testing.assert_close(blocks, out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_bf16_autocast_forward_backward_cpu(head):
    sim = make_sim(head)
    img, img_lens, cap, cap_lens = _inputs(4, 6, 5, 7)
    ref = sim(img, img_lens, cap, cap_lens).detach()
    img.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sim(img, img_lens, cap, cap_lens)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(img.grad).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_half_precision_forward_finite(head):
    """bf16 parameters and inputs end to end (no autocast)."""
    sim = make_sim(head, torch.bfloat16)
    img, img_lens, cap, cap_lens = _inputs(3, 5, 4, 6, torch.bfloat16)
    with torch.no_grad():
        out = sim(img, img_lens, cap, cap_lens)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("focal", ["equal", "prob"])
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_bfan_empty_focal_set_is_finite(focal, direction):
    """Identical regions (and identical words) give uniform attention, so no item exceeds the
    focal threshold and the focal set is empty: BFAN falls back to every valid item; the score
    is finite, equals the engine's, and so is the gradient."""
    sim = make_sim("bfan_equal", focal=focal, direction=direction)
    v = l2n(torch.randn(1, 1, D))
    img = v.expand(2, 5, D).clone().requires_grad_(True)
    w = l2n(torch.randn(1, 1, D))
    cap = w.expand(3, 4, D).clone().requires_grad_(True)
    img_lens, cap_lens = torch.tensor([5, 3]), torch.tensor([4, 2, 1])
    out = sim(img, img_lens, cap, cap_lens)
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(cap.grad).all()
    with torch.no_grad():
        blocks = sim.score_matrix(img.detach(), img_lens, cap.detach(), cap_lens)
    torch.testing.assert_close(blocks, out.detach(), atol=1e-4, rtol=1e-4)
    # uniform attention over identical items: each cosine is cos(v, w) -> the t2i / i2t means too
    cos = float((v * w).sum())
    n_dirs = 2 if direction == "both" else 1
    torch.testing.assert_close(out.detach(), torch.full((2, 3), n_dirs * cos), atol=1e-4, rtol=0)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_imram_many_steps_stable(direction):
    steps = 30
    sim = make_sim("imram", steps=steps, direction=direction)
    img, img_lens, cap, cap_lens = _inputs(3, 6, 4, 7)
    img.requires_grad_(True)
    out = sim(img, img_lens, cap, cap_lens)
    assert torch.isfinite(out).all()
    # each step adds a pooled cosine per direction: |score| <= steps * directions
    assert float(out.abs().max()) <= steps * (2 if direction == "both" else 1) + 1e-3
    out.sum().backward()
    # no blow-up through 30 memory updates: finite and bounded (the largest entry measures
    # ~1.04e4 for `both` on this machine's CPU build; exponential growth would be far beyond)
    assert torch.isfinite(img.grad).all() and float(img.grad.abs().max()) < 1e5
    with torch.no_grad():
        blocks = sim.score_matrix(img.detach(), img_lens, cap, cap_lens, max_block_mb=1)
    torch.testing.assert_close(blocks, out.detach(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("lam", [0.0, 1e-3, 50.0, 200.0])
@pytest.mark.parametrize("head", ["scan_t2i", "scan_i2t", "bfan_equal"])
def test_extreme_softmax_temperature_finite(head, lam):
    sim = make_sim(head, lambda_softmax=lam)
    img, img_lens, cap, cap_lens = _inputs(3, 5, 4, 6)
    out = sim(img, img_lens, cap, cap_lens)
    assert torch.isfinite(out).all(), (head, lam, out)
    with torch.no_grad():
        blocks = sim.score_matrix(img, img_lens, cap, cap_lens)
    torch.testing.assert_close(blocks, out.detach(), atol=1e-4, rtol=1e-4)


# --- training in reduced precision -------------------------------------------------------------------


@pytest.mark.parametrize("align,pool", [("scan", "lse"), ("imram", "avg")])
def test_bf16_mixed_training_on_cpu(compose, tmp_path, align, pool):
    """``trainer.precision=bf16-mixed`` trains on CPU without NaN or inf."""
    from omegaconf import open_dict

    from itm.train import train

    cfg = compose(
        [
            "debug=fast",
            f"model/align={align}",
            f"pooling={pool}",
            "model.embed_size=32",
            "model.text_encoder.word_dim=16",
            "trainer.precision=bf16-mixed",
            "trainer.limit_train_batches=4",
            "trainer.log_every_n_steps=1",
            "logger=csv",
            "callbacks.alignment_images=null",
            "callbacks.progress_bar=null",
        ]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    metrics = train(cfg)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    import csv

    with open(tmp_path / "csv" / "metrics.csv") as fh:
        losses = [float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    assert losses and all(math.isfinite(x) for x in losses)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_gpu_autocast_forward_backward(head, dtype):
    sim = make_sim(head).cuda()
    img, img_lens, cap, cap_lens = (t.cuda() for t in _inputs(4, 36, 6, 12))
    ref = sim(img, img_lens, cap, cap_lens).detach()
    img.requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype):
        out = sim(img, img_lens, cap, cap_lens)
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(img.grad).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        blocks = sim.score_matrix(img.detach(), img_lens, cap, cap_lens)
    assert torch.isfinite(blocks).all()
