"""The fused C kernel of SCAN's soft attention (``itm.models.align.fused``): equal to the tensor
kernel and to the naive NumPy reference on padded blocks (garbage in the padding, tails of
fewer than 16 query sets, one-item sets), thread-count independent, a clean fallback when it is
disabled or cannot be built, and a safe cache: keyed by the CPU's real features (Linux and
macOS), a fallback directory when the cache is unusable, one build for processes starting
together, a working thread pool in a forked child."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from itm.models import Similarity
from itm.models.align import fused
from itm.models.align.engine import Workspace, attend_cosine, context_gram, invalid_rows
from itm.models.align.scan import SCAN
from itm.models.pooling import AvgPool, LSEPool
from reference import random_sets, scan_scores


def gram_with_ones(ctx, ctx_mask):
    """``[G ; m^T]`` of the context sets (the kernels' Gram input)."""
    return context_gram(ctx, ctx_mask)["gram1"]


if fused.load() is None:  # pragma: no cover - machines without a C compiler
    pytest.skip("the fused kernel cannot be built here", allow_module_level=True)


def _block(seed, bc, kc, lq, bq, d=24, garbage=True):
    """Raw scores ``[Bc, Kc, Lq*Bq]`` (query items item-major) of random context / query sets;
    padded queries are zero, padded context items hold garbage scores (any finite value)."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(bc, kc, d, generator=g, dtype=torch.float64)
    ctx_lens = torch.randint(1, kc + 1, (bc,), generator=g)
    ctx_mask = torch.arange(kc)[None] < ctx_lens[:, None]
    ctx = torch.where(ctx_mask[..., None], ctx, 0.0)
    q = torch.randn(lq, bq, d, generator=g, dtype=torch.float64)
    q_lens = torch.randint(1, lq + 1, (bq,), generator=g)
    q_mask = torch.arange(lq)[:, None] < q_lens[None]  # [Lq, Bq]
    q = torch.where(q_mask[..., None], q, 0.0)
    s = torch.einsum("ckd,wjd->ckwj", ctx, q).reshape(bc, kc, lq * bq)
    if garbage:  # padded context rows: the kernels must ignore them
        rows = s.view(bc * kc, -1)
        pad = ~ctx_mask.reshape(-1)
        rows[pad] = torch.randn(int(pad.sum()), rows.shape[1], generator=g, dtype=s.dtype) * 50
    return s, ctx, ctx_mask, (q * q).sum(-1), q_mask


def _tensor_kernel(s, ctx, ctx_mask, q_sq, bq, kind, lam):
    return attend_cosine(
        Workspace(),
        s,
        bq,
        gram_with_ones(ctx, ctx_mask),
        invalid_rows(ctx_mask),
        q_sq,
        kind,
        lam,
    )


SHAPES = [(3, 5, 4, 16), (2, 36, 7, 37), (4, 1, 1, 1), (1, 9, 3, 5), (2, 20, 1, 33)]


@pytest.mark.parametrize(("bc", "kc", "lq", "bq"), SHAPES)
@pytest.mark.parametrize("kind", ["clipped_l2norm", "l2norm"])
@pytest.mark.parametrize("lam", [4.0, 9.0, 30.0])
def test_equals_tensor_kernel(bc, kc, lq, bq, kind, lam):
    s, ctx, ctx_mask, q_sq, q_mask = _block(bc * 100 + kc + lq + bq, bc, kc, lq, bq)
    want = _tensor_kernel(s, ctx, ctx_mask, q_sq, bq, kind, lam)  # float64
    got = fused.attend_cosine_fused(
        s.float(), bq, gram_with_ones(ctx, ctx_mask).float(), ctx_mask, q_sq.float(), kind, lam
    )
    assert got is not None and got.shape == (bc, lq, bq) and got.dtype == torch.float32
    valid = q_mask[None].expand_as(got)  # padded query items are dropped by the pooling
    assert torch.isfinite(got[valid]).all()
    torch.testing.assert_close(got.double()[valid], want[valid], rtol=0, atol=2e-5)


@pytest.mark.parametrize(("bc", "kc", "lq", "bq"), SHAPES)
@pytest.mark.parametrize("kind", ["clipped_l2norm", "l2norm"])
def test_bf16_scores_equal_the_widened_float32_scores(bc, kc, lq, bq, kind):
    """bf16 scoring hands the kernel bfloat16 scores: it widens each context set's slab and
    computes exactly what the float32 kernel computes on the widened scores."""
    s, ctx, ctx_mask, q_sq, q_mask = _block(bc * 7 + kc + lq + bq, bc, kc, lq, bq, garbage=False)
    s16 = s.to(torch.bfloat16)
    args = (bq, gram_with_ones(ctx, ctx_mask).float(), ctx_mask, q_sq.float(), kind, 9.0)
    got = fused.attend_cosine_fused(s16, *args)
    want = fused.attend_cosine_fused(s16.float(), *args)
    assert got is not None and got.dtype == torch.float32
    valid = q_mask[None].expand_as(got)
    assert torch.equal(got[valid], want[valid])


def test_bf16_scoring_takes_the_fused_kernel(monkeypatch):
    seen = []
    real = fused.attend_cosine_fused

    def spy(s, *args):
        seen.append(s.dtype)
        return real(s, *args)

    monkeypatch.setattr(fused, "attend_cosine_fused", spy)
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 6, 32, generator=g), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(7, 4, 32, generator=g), dim=-1)
    il, cl = torch.tensor([6, 2, 6, 5, 1]), torch.tensor([4, 1, 3, 4, 2, 4, 4])
    sim = Similarity(SCAN("both"), LSEPool())
    got = sim.score_matrix(img, il, cap, cl, precision="bf16", exact_top=0)
    assert torch.bfloat16 in seen
    torch.testing.assert_close(got, sim.score_matrix(img, il, cap, cl), rtol=0, atol=2e-2)


def test_output_is_query_set_major():
    """The kernel writes ``[Bc, Bq, Lq]`` (what the pooling reads) and returns its view."""
    s, ctx, ctx_mask, q_sq, _ = _block(1, 2, 5, 3, 4)
    got = fused.attend_cosine_fused(
        s.float(), 4, gram_with_ones(ctx, ctx_mask).float(), ctx_mask, q_sq.float(), "l2norm", 9
    )
    assert got.transpose(1, 2).is_contiguous()


def test_hand_checked_two_items():
    """One image of two regions, one word: t2i cosine by hand."""
    v = np.array([[1.0, 0.0], [0.0, 2.0]])  # regions
    e = np.array([0.6, 0.8])  # the word
    s = v @ e  # [0.6, 1.6]; clipped_l2norm over ONE word: s / |s| = [1, 1] (both > 0)
    w = np.exp(9.0 * np.ones(2) * s / (np.abs(s) + 1e-8))
    alpha = w / w.sum()  # equal weights: [0.5, 0.5]
    att = alpha @ v  # [0.5, 1.0]
    want = att @ e / (np.linalg.norm(att) * np.linalg.norm(e))
    got = fused.attend_cosine_fused(
        torch.tensor(s, dtype=torch.float32).view(1, 2, 1),
        1,
        torch.tensor(v @ v.T, dtype=torch.float32)[None],
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([[e @ e]], dtype=torch.float32),
        "clipped_l2norm",
        9.0,
    )
    assert abs(float(got) - want) < 1e-6
    assert abs(want - (0.3 + 0.8) / np.sqrt(1.25)) < 1e-7  # 0.9839 (up to the 1e-8 of the norm)


@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
def test_engine_float32_equals_naive_reference(direction):
    """Full SCAN scoring through the fused kernel vs the one-pair-at-a-time NumPy reference."""
    rng = np.random.default_rng(11)
    il, cl = rng.integers(1, 8, 21), rng.integers(1, 9, 19)
    il[0], cl[0] = 1, 1
    img = random_sets(rng, 21, 7, 16, il)
    cap = random_sets(rng, 19, 8, 16, cl)
    sim = Similarity(SCAN(direction, 9.0), LSEPool(6.0))
    calls = []
    real = fused.attend_cosine_fused

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "attend_cosine_fused", spy)
        got = sim.score_matrix(
            torch.tensor(img, dtype=torch.float32),
            torch.tensor(il),
            torch.tensor(cap, dtype=torch.float32),
            torch.tensor(cl),
            max_block_mb=0.01,  # several blocks, tails of < 16 query sets
        )
    assert calls and all(calls)
    want = scan_scores(img, il, cap, cl, direction, 9.0, "clipped_l2norm", "lse")
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=3e-5)


def test_thread_count_does_not_change_results():
    s, ctx, ctx_mask, q_sq, _ = _block(5, 7, 12, 5, 40)
    args = (s.float(), 40, gram_with_ones(ctx, ctx_mask).float(), ctx_mask, q_sq.float())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.attend_cosine_fused(*args, "clipped_l2norm", 9.0)
        torch.set_num_threads(2)
        two = fused.attend_cosine_fused(*args, "clipped_l2norm", 9.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_not_used_for_float64_gpu_or_other_norms(monkeypatch):
    s, ctx, ctx_mask, q_sq, _ = _block(2, 2, 3, 2, 4)
    g1 = gram_with_ones(ctx, ctx_mask)
    assert fused.attend_cosine_fused(s, 4, g1, ctx_mask, q_sq, "l2norm", 9.0) is None  # float64
    f32 = (s.float(), 4, g1.float(), ctx_mask, q_sq.float())
    assert fused.attend_cosine_fused(*f32, "softmax", 9.0) is None
    monkeypatch.setenv("ITM_FUSED", "0")
    assert fused.attend_cosine_fused(*f32, "l2norm", 9.0) is None


def test_disabled_engine_gives_same_scores(monkeypatch):
    rng = np.random.default_rng(3)
    il, cl = rng.integers(1, 6, 9), rng.integers(1, 7, 13)
    img = torch.tensor(random_sets(rng, 9, 5, 8, il), dtype=torch.float32)
    cap = torch.tensor(random_sets(rng, 13, 6, 8, cl), dtype=torch.float32)
    sim = Similarity(SCAN("both", 9.0), AvgPool())
    args = (img, torch.tensor(il), cap, torch.tensor(cl))
    on = sim.score_matrix(*args)
    monkeypatch.setenv("ITM_FUSED", "0")
    off = sim.score_matrix(*args)
    torch.testing.assert_close(on, off, rtol=0, atol=2e-6)


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(fused, "_compiler", lambda: None)
    fused.reset()
    try:
        s, ctx, ctx_mask, q_sq, _ = _block(4, 2, 3, 2, 4)
        args = (s.float(), 4, gram_with_ones(ctx, ctx_mask).float(), ctx_mask, q_sq.float())
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert fused.attend_cosine_fused(*args, "l2norm", 9.0) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the failure is remembered: no second warning
            assert fused.attend_cosine_fused(*args, "l2norm", 9.0) is None
        # the engine still scores, through the tensor kernel
        img, cap = ctx.float(), ctx.float()
        lens = ctx_mask.sum(1)
        sim = Similarity(SCAN("t2i"), LSEPool())
        with torch.no_grad():
            direct = sim(img, lens, cap, lens)
        torch.testing.assert_close(sim.score_matrix(img, lens, cap, lens), direct)
    finally:
        monkeypatch.undo()
        fused.reset()
    assert fused.load() is not None


def test_compile_error_names_the_compiler(tmp_path, monkeypatch):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(fused, "SOURCE", bad)
    monkeypatch.setenv("ITM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="failed to build bad.c"):
        fused.build()
    left = [p.name for p in (tmp_path / "cache" / "kernels").iterdir()]
    assert not [n for n in left if not n.endswith(".lock")], left  # nothing half-written


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("ITM_CACHE_DIR", str(tmp_path))
    first = fused.build()
    assert first.parent == tmp_path / "kernels" and first.suffix == ".so"
    mtime = first.stat().st_mtime_ns
    assert fused.build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    files = sorted(p.name for p in first.parent.iterdir())
    assert files == [f".{first.name}.lock", first.name]  # no temporary left (the lock stays)
    assert os.access(first, os.R_OK)


def test_workspace_memo_follows_its_key():
    ws = Workspace()
    built = []

    def make():
        built.append(1)
        return torch.zeros(3)

    a = ws.memo("x", (0, 4), make)
    assert ws.memo("x", (0, 4), make) is a and len(built) == 1
    assert ws.memo("x", (4, 8), make) is not a and len(built) == 2
    assert ws.nbytes == 3 * 4  # only the latest key's tensor is kept


# --- the kernel cache: CPU key, unusable cache, concurrent builds, fork ---------------------------


def test_cache_key_follows_the_cpu_features(monkeypatch):
    """A kernel built for another CPU (other feature flags, or other -march=native macros, e.g.
    AVX-512 vs not) has another file name: it is never loaded here."""
    cc = fused._compiler()
    here = fused.kernel_name(cc)
    assert fused.kernel_name(cc) == here  # stable
    monkeypatch.setattr(fused, "cpu_features", lambda: "flags: fpu sse2 avx2")
    no512 = fused.kernel_name(cc)
    monkeypatch.setattr(fused, "cpu_features", lambda: "flags: fpu sse2 avx2 avx512f")
    with512 = fused.kernel_name(cc)
    assert len({here, no512, with512}) == 3
    monkeypatch.setattr(fused, "native_macros", lambda cc: "#define __AVX2__ 1")
    assert fused.kernel_name(cc) != with512


def test_native_macros_name_the_instruction_sets():
    macros = fused.native_macros(fused._compiler())
    assert "#define __" in macros
    if "avx512f" in fused.cpu_features().split():  # the compiler sees what the CPU has
        assert "__AVX512F__" in macros


def test_cpu_features_on_linux_x86_and_arm(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon X\n"
        "flags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    )
    text = fused.read_cpuinfo(x86)
    assert "flags: fpu avx2 avx512f" in text and "model name: Xeon X" in text
    assert "flags: fpu\n" not in text + "\n"  # the first processor only
    arm = tmp_path / "arm"
    arm.write_text(
        "processor\t: 0\nFeatures\t: fp asimd sve\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    )
    assert (
        fused.read_cpuinfo(arm) == "cpu implementer: 0x41\ncpu part: 0xd0c\nfeatures: fp asimd sve"
    )


def test_cpu_features_on_macos(monkeypatch):
    answers = {
        "machdep.cpu.brand_string": "Intel(R) Core(TM) i9",
        "machdep.cpu.features": "FPU SSE2 AVX1.0",
        "machdep.cpu.leaf7_features": "AVX2 AVX512F",
        "hw.optional": "hw.optional.avx512f: 1",
    }
    calls = []

    def sysctl(cmd):
        calls.append(cmd)
        return answers[cmd[-1]] + "\n"

    monkeypatch.setattr(fused.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(fused, "_run", sysctl)
    text = fused.cpu_features()
    assert all(cmd[0] == "sysctl" for cmd in calls)
    for value in answers.values():
        assert value in text


def test_unusable_cache_falls_back_to_a_private_directory(tmp_path, monkeypatch, caplog):
    """ITM_CACHE_DIR that cannot be created (here: below a regular file; a read-only file
    system behaves alike) -> the kernel is built in the per-user temporary directory."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("ITM_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(fused.tempfile, "tempdir", str(tmp_path / "tmp"))
    with caplog.at_level("WARNING", logger="itm"):
        out = fused.build()
    assert out.parent == fused.fallback_cache_dir() and out.is_file()
    assert str(tmp_path / "tmp") in str(out)
    assert (out.parent.parent.stat().st_mode & 0o077) == 0  # private to this user
    assert (out.parent.stat().st_mode & 0o077) == 0
    assert "not-a-dir" in caplog.text  # says why
    assert fused.build() == out  # found there next time


def test_a_foreign_fallback_directory_is_refused(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("ITM_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(fused.tempfile, "tempdir", str(tmp_path / "tmp"))
    shared = fused.fallback_cache_dir()
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # others could plant a library there
    with pytest.raises(RuntimeError, match="no writable kernel cache"):
        fused.build()


CC_SPY = """#!/bin/sh
# counts compilations (the -shared call), then runs the real compiler
case " $* " in *" -shared "*) echo build >> "{log}"; sleep 1;; esac
exec "{cc}" "$@"
"""

BUILDER = """
import sys
from itm.models.align import fused
print(fused.build())
"""


def test_processes_starting_together_build_once(tmp_path):
    log = tmp_path / "builds.log"
    spy = tmp_path / "cc"
    spy.write_text(CC_SPY.format(log=log, cc=fused._compiler()))
    spy.chmod(0o755)
    env = {**os.environ, "CC": str(spy), "ITM_CACHE_DIR": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1 and Path(paths.pop()).is_file()
    assert log.read_text().split() == ["build"]  # one compilation, the others waited


def _score_in_child(queue, args):
    torch.set_num_threads(2)
    out = fused.attend_cosine_fused(*args, "clipped_l2norm", 9.0)
    queue.put((fused._pool_size, out.numpy()))  # by value (a tensor would pass a handle)


def test_forked_child_gets_a_working_thread_pool():
    """The parent's pool threads do not exist in a forked child: the child must start its own
    (without the at-fork reset it waits forever on the inherited pool)."""
    import multiprocessing as mp

    s, ctx, ctx_mask, q_sq, _ = _block(7, 6, 9, 4, 20)
    args = (s.float(), 20, gram_with_ones(ctx, ctx_mask).float(), ctx_mask, q_sq.float())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = fused.attend_cosine_fused(*args, "clipped_l2norm", 9.0)
    finally:
        torch.set_num_threads(threads)
    # both workers of the parent's pool alive at the fork (a pool that never filled up would
    # start a thread in the child and hide the problem)
    barrier = threading.Barrier(2)
    list(fused._executor(2).map(lambda _: barrier.wait(timeout=30), range(2)))
    assert fused._pool is not None and fused._pool_size == 2
    context = mp.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_score_in_child, args=(queue, args))
    child.start()
    try:
        pool_size, got = queue.get(timeout=30)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert pool_size == 2 and np.array_equal(got, want.numpy())
