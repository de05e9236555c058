"""Scoring engine vs the reference code's loop structure vs the matrix-product floor.

Workload (Flickr30K-shaped): 256 images x 36 regions against 1280 captions of 8..20 words
(including start/end), d = 1024, float32, all threads. For every head, pairs/s of
``Similarity.score_matrix`` beside (a) a loop baseline that follows the authors' code
(``bench/baselines.py``: a Python loop over captions, each attending all images of a
128-image block, attended vectors materialised) and (b) the floor: 2*K*L*d flops per pair over
the REAL words, at the GEMM rate measured in this run (the best of several timings of a
(36*128, d) x (d, 14*128) product, so the floor is never flattered). BFAN and IMRAM, whose
baselines take minutes, are timed on a subset of the workload (both sides on the same pairs).
Also: a training step (SCAN t2i, batch 128, forward + backward) against the loop baseline, with
peak memory (ru_maxrss growth in a fresh subprocess), and the peak RSS growth of scoring 2000
images x 10000 captions under a 256 MB block budget.

    python bench/run.py scoring            # or: make bench BENCH=scoring
    python bench/bench_scoring.py --quick  # small shapes (seconds; a smoke test)
    python bench/run.py scoring -- --threads 1 --cpu-time   # robust to a loaded machine
    python bench/run.py scoring -- --heads scan_t2i,chan --no-train --no-rss   # some rows

SCAN's float32 rows use the fused C attention kernel (``itm.models.align.fused``); the
``*_tensor`` rows repeat them with it switched off (the tensor kernel of float64 / GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import baselines  # noqa: E402

from itm.models import ContrastiveLoss, Similarity  # noqa: E402
from itm.models.align import fused  # noqa: E402
from itm.models.align.bfan import BFAN  # noqa: E402
from itm.models.align.chan import CHAN  # noqa: E402
from itm.models.align.imram import IMRAM  # noqa: E402
from itm.models.align.scan import SCAN  # noqa: E402
from itm.models.pooling import AvgPool, LSEPool  # noqa: E402

TARGETS = {  # must-show targets of the issue
    "scan_t2i": "<= 1.5x floor",
    "scan_i2t": "<= 1.5x floor",
    "scan_t2i_tensor": "(no fused kernel)",
    "scan_i2t_tensor": "(no fused kernel)",
    "chan": "<= 1.2x floor",
    "bfan": ">= 10x baseline",
    "imram": ">= 10x baseline",
}


def workload(n_img: int, n_cap: int, k: int, d: int, seed: int = 0, l_min=8, l_max=20):
    """Unit-norm fragments; padded word slots hold garbage (must not matter)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, k, d, generator=g), dim=-1)
    cap_lens = torch.randint(l_min, l_max + 1, (n_cap,), generator=g)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, l_max, d, generator=g), dim=-1)
    pad = torch.arange(l_max)[None, :] >= cap_lens[:, None]
    cap[pad] = 3.0
    return img, torch.full((n_img,), k), cap, cap_lens


class GemmRate:
    """GFLOP/s of a (36*128, d) x (d, 14*128) product, the floor's matrix product.

    ``best``: the best single product (~0.1 s) seen so far in the run, the rate of the "x floor"
    column. :meth:`floor_time` runs a row's whole floor, i.e. back-to-back products totalling
    its flops, right before each engine timing: the "x paired" column is the median over the
    engine timings of engine time / the floor time measured beside it, so both sides of every
    ratio ran for about as long and at the same moment (on a shared machine the best 0.1 s
    burst can be 10-30% above what a run of seconds gets; on a quiet machine they agree)."""

    def __init__(self, k: int, d: int, n_img: int = 128, n_cap: int = 128, n_words: int = 14):
        self.a = torch.randn(k * n_img, d)
        self.b = torch.randn(n_words * n_cap, d)
        self.out = torch.empty(self.a.shape[0], self.b.shape[0])
        self.flops = 2 * self.a.shape[0] * self.b.shape[0] * d
        self.best = 0.0

    def measure(self, reps: int = 5) -> float:
        torch.mm(self.a, self.b.T, out=self.out)
        for _ in range(reps):
            t0 = CLOCK()
            torch.mm(self.a, self.b.T, out=self.out)
            self.best = max(self.best, self.flops / max(CLOCK() - t0, 1e-9))
        return self.best

    def floor_time(self, flops: float) -> float:
        """Seconds of ``flops`` worth of back-to-back products (at least one, time scaled)."""
        n = max(1, round(flops / self.flops))
        t0 = CLOCK()
        for _ in range(n):
            torch.mm(self.a, self.b.T, out=self.out)
        return (CLOCK() - t0) * flops / (n * self.flops)


#: the clock of every timing: wall time, or process CPU time (``--cpu-time``, meaningful with
#: ``--threads 1`` on a machine that other jobs load: it counts only the cycles this run got)
CLOCK = time.perf_counter


def paired_times(fn, reps: int, floor) -> tuple[float, float]:
    """``reps`` timings of ``fn``, each right after a timing of ``floor()`` (which returns its
    own seconds): (best time of ``fn``, median of the ``fn`` / floor ratios)."""
    best, ratios = float("inf"), []
    for _ in range(reps):
        gc.collect()
        floor_s = floor()
        t0 = CLOCK()
        fn()
        t = CLOCK() - t0
        best = min(best, t)
        ratios.append(t / max(floor_s, 1e-9))
    ratios.sort()
    return best, ratios[len(ratios) // 2]


def best_time(fn, reps: int) -> float:
    """Best of ``reps`` timings of ``fn``."""
    return paired_times(fn, reps, lambda: 1.0)[0]


def heads(d: int, tensor_kernel_rows: bool = False) -> dict[str, Similarity]:
    """The benchmarked heads; ``tensor_kernel_rows`` adds SCAN rows scored with the fused
    attention kernel switched off (what float64 and GPU tensors use)."""
    torch.manual_seed(0)
    extra = {}
    if tensor_kernel_rows:
        extra = {
            "scan_t2i_tensor": Similarity(SCAN("t2i", 9.0), LSEPool(6.0)),
            "scan_i2t_tensor": Similarity(SCAN("i2t", 4.0), AvgPool()),
        }
    return {
        "scan_t2i": Similarity(SCAN("t2i", 9.0), LSEPool(6.0)),
        "scan_i2t": Similarity(SCAN("i2t", 4.0), AvgPool()),
        **extra,
        "bfan": Similarity(BFAN("equal", 20.0, "both"), AvgPool()),
        "chan": Similarity(CHAN("t2i"), LSEPool(10.0, rescale=False)),
        "imram": Similarity(IMRAM("both", 3, 9.0, embed_size=d), AvgPool()),
    }


def baseline_fn(name: str, sim: Similarity):
    name = name.removesuffix("_tensor")
    return {
        "scan_t2i": lambda i, c, cl: baselines.scan_t2i(i, c, cl, 9.0, 6.0),
        "scan_i2t": lambda i, c, cl: baselines.scan_i2t(i, c, cl, 4.0),
        "bfan": lambda i, c, cl: baselines.bfan(i, c, cl, 20.0),
        "chan": lambda i, c, cl: baselines.chan_t2i(i, c, cl, 10.0),
        "imram": lambda i, c, cl: baselines.imram(i, c, cl, sim.align, 9.0),
    }[name]


def check_baselines(d: int) -> float:
    """Largest |baseline - engine| over every head on a small input (float64)."""
    img, il, cap, cl = workload(6, 9, 5, 16, seed=1, l_min=1, l_max=7)
    img, cap = img.double(), cap.double()
    worst = 0.0
    with torch.no_grad():
        for name, sim in heads(16).items():
            sim = sim.double()
            ours = sim.score_matrix(img, il, cap, cl)
            ref = baseline_fn(name, sim)(img, cap, cl)
            worst = max(worst, float((ours - ref).abs().max()))
    return worst


class fused_kernel:  # noqa: N801 - used like a function
    """Context manager: score with (True) or without (False) the fused SCAN attention kernel."""

    def __init__(self, on: bool) -> None:
        self.on, self.old = on, None

    def __enter__(self) -> None:
        self.old = os.environ.get("ITM_FUSED")
        os.environ["ITM_FUSED"] = "1" if self.on else "0"

    def __exit__(self, *exc) -> None:
        if self.old is None:
            os.environ.pop("ITM_FUSED", None)
        else:
            os.environ["ITM_FUSED"] = self.old


def imram_flops(k: int, d: int, cap_lens, steps: int) -> tuple[float, float]:
    """Matrix-product flops per image of IMRAM full mode over the given captions: the loop
    baseline (the reference's structure) and the engine. Per pair and direction, with ``q``
    query and ``c`` context fragments: the loop does, every step, the scores and the attended
    vectors (``4qcd``) and the MDU's two Linear(2d, d) on ``[q, 2d]`` (``8qd^2``); the engine
    shares the step-1 scores of both directions (``2KLd``), and per step after the first the
    memory's scores (``2qcd``), the attended half mixed by the weights (``[q, c] @ [c, 2d]``,
    ``4qcd``), and from step 2 on the MDU's query half of the per-pair memory (``4qd^2``; at
    step 1 the memory is the fragments themselves, done once per caption / image)."""
    loop = engine = 0.0
    for n_words in cap_lens.tolist():
        engine += 2 * k * n_words * d
        for q, c in ((n_words, k), (k, n_words)):
            loop += steps * (4 * q * c * d + 8 * q * d * d)
            engine += (steps - 1) * (2 * q * c * d + 4 * q * c * d)
            engine += max(steps - 2, 0) * 4 * q * d * d
    return loop, engine


# --- subprocess children: training step and RSS ---------------------------------------------


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0), so the peak of what follows is
    measured, not the transient peak of building the inputs."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _maxrss_mb() -> float:
    """Peak RSS since the last reset (VmHWM), else ru_maxrss; MiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _maxrss_mb()


def child_train(kind: str, batch: int, k: int, d: int) -> dict:
    img, il, cap, cl = workload(batch, batch, k, d, seed=2)
    img.requires_grad_(True)
    cap.requires_grad_(True)
    sim = Similarity(SCAN("t2i", 9.0), LSEPool(6.0))
    loss_fn = ContrastiveLoss(margin=0.2, max_violation=True)

    def step():
        img.grad = cap.grad = None
        if kind == "ours":
            loss = loss_fn(sim(img, il, cap, cl))
        else:
            loss = baselines.contrastive_loss(baselines.scan_t2i(img, cap, cl, 9.0, 6.0))
        loss.backward()

    gc.collect()
    _reset_peak()
    before = _current_rss_mb()
    step()  # warm-up; its peak counts
    seconds = best_time(step, 2)
    return {"seconds": seconds, "peak_mb": _maxrss_mb() - before}


def child_rss(n_img: int, n_cap: int, k: int, d: int, budget_mb: float) -> dict:
    img, il, cap, cl = workload(n_img, n_cap, k, d, seed=3)
    sim = Similarity(SCAN("t2i", 9.0), LSEPool(6.0))
    gc.collect()
    _reset_peak()
    before = _current_rss_mb()
    t0 = CLOCK()
    out = sim.score_matrix(img, il, cap, cl, max_block_mb=budget_mb)
    seconds = CLOCK() - t0
    return {
        "growth_mb": _maxrss_mb() - before,
        "output_mb": out.numel() * out.element_size() / 2**20,
        "inputs_mb": (img.numel() + cap.numel()) * 4 / 2**20,
        "seconds": seconds,
    }


def run_child(args: list[str], threads: int = 0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--threads={threads}"]
    cmd += ["--cpu-time", "--child"] if CLOCK is time.process_time else ["--child"]
    cmd += args
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--captions", type=int, default=1280)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--budget-mb", type=float, default=256)
    p.add_argument("--reps", type=int, default=5, help="engine timings per head (best kept)")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--rss-images", type=int, default=2000)
    p.add_argument("--rss-captions", type=int, default=10000)
    p.add_argument("--rss-dim", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all)")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time (use with --threads 1 on a loaded machine)",
    )
    p.add_argument(
        "--loop-captions",
        type=int,
        default=256,
        help="captions the SCAN / CHAN loop baselines are timed on (pairs/s; all images)",
    )
    p.add_argument(
        "--heads",
        default="",
        help="comma-separated subset of the table's rows (e.g. scan_t2i,scan_i2t,chan)",
    )
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args([] if argv is None else argv)  # bench/run.py passes None

    global CLOCK
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cpu_time:
        CLOCK = time.process_time
    if a.child:
        kind, *nums = a.child
        if kind == "rss":
            n_img, n_cap, k, d, budget = (float(x) for x in nums)
            res = child_rss(int(n_img), int(n_cap), int(k), int(d), budget)
        else:
            res = child_train(kind, *(int(x) for x in nums))
        print(json.dumps(res))
        return

    if a.quick:
        a.images, a.captions, a.dim, a.reps = 32, 64, 128, 1
        a.rss_images, a.rss_captions, a.rss_dim = 200, 1000, 64
    k, d = a.regions, a.dim
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"{'CPU' if CLOCK is time.process_time else 'wall'} time; workload "
        f"{a.images} images x {a.captions} captions, K={k}, L=8..20, d={d}, "
        f"block budget {a.budget_mb:g} MB"
    )
    lib = fused.load()
    print(
        "fused SCAN attention kernel (float32 CPU): "
        + ("built and used" if lib is not None and fused.enabled() else "NOT used")
        + "; the *_tensor rows switch it off"
    )
    err = check_baselines(d)
    print(f"check: max |loop baseline - engine| over all heads (float64, small input) = {err:.1e}")
    if err > 1e-9:
        raise SystemExit("baseline and engine disagree")

    img, il, cap, cl = workload(a.images, a.captions, k, d)
    rate = GemmRate(k, d)
    rate.measure()
    rows = []
    # (images, captions) timed per side; the slow heads run on a subset of the workload, the
    # loop baselines of SCAN / CHAN on fewer captions (pairs/s is what is compared)
    engine_sets = {"bfan": (min(a.images, 128), min(a.captions, 256)), "imram": (16, 64)}
    loop_sets = {"bfan": (min(a.images, 128), 64), "imram": (16, 32)}
    loops = {}  # the SCAN rows without the fused kernel share their loop baseline
    paired = {}  # head -> median of engine time / floor time measured beside it
    chosen = {h for h in a.heads.split(",") if h}
    for name, sim in heads(d, tensor_kernel_rows=not a.quick).items():
        if chosen and name not in chosen:
            continue
        full = (a.images, a.captions)
        times = {}
        for side, (n_i, n_c) in (
            ("engine", engine_sets.get(name, full)),
            ("loop", loop_sets.get(name, (a.images, min(a.captions, a.loop_captions)))),
        ):
            im, ca, cll = img[:n_i], cap[:n_c], cl[:n_c]
            flops = 2 * k * int(cll.sum()) * d * n_i
            base_name = name.removesuffix("_tensor")
            if side == "loop" and base_name in loops:
                times[side] = loops[base_name]
                continue
            with torch.no_grad(), fused_kernel(not name.endswith("_tensor")):
                if side == "engine":
                    fn = partial(sim.score_matrix, im, il[:n_i], ca, cll, max_block_mb=a.budget_mb)
                    seconds, paired[name] = paired_times(
                        fn, a.reps, partial(rate.floor_time, flops)
                    )
                else:
                    seconds = best_time(partial(baseline_fn(name, sim), im, ca, cll), 1)
            rate.measure()
            times[side] = (n_i * n_c, seconds, flops)
            if side == "loop":
                loops[base_name] = times[side]
        pairs, ours, flops = times["engine"]
        loop_pairs, loop_s, _ = times["loop"]
        base = loop_s * pairs / loop_pairs  # the loop's time for the engine's pairs
        rows.append((name, pairs, ours, base, flops))
        print(
            f"  {name}: engine {pairs} pairs in {ours:.2f} s; loop {loop_pairs} pairs in "
            f"{loop_s:.2f} s; floor {flops / rate.best:.2f} s (at the best GEMM rate so far)",
            flush=True,
        )

    print(
        f"\nGEMM rate (best of this run): {rate.best / 1e9:.0f} GFLOP/s. x floor: the engine's "
        "best time / the floor at that rate; x paired: median over the engine timings of "
        "engine time / the floor's products run just before it"
    )
    hdr = (
        f"{'head':<16}{'pairs':>8}{'engine pairs/s':>16}{'loop pairs/s':>14}"
        f"{'floor pairs/s':>15}{'x floor':>9}{'x paired':>10}{'vs loop':>9}  target"
    )
    print(hdr + "\n" + "-" * (len(hdr) + 16))
    for name, pairs, ours, base, flops in rows:
        floor = flops / rate.best  # every row at the run's best rate: never flattered
        print(
            f"{name:<16}{pairs:>8}{pairs / ours:>16,.0f}{pairs / base:>14,.0f}"
            f"{pairs / floor:>15,.0f}{ours / floor:>8.2f}x"
            f"{paired[name]:>9.2f}x{base / ours:>8.1f}x  {TARGETS[name]}"
        )

    if not chosen or "imram" in chosen:
        n_i, n_c = engine_sets["imram"]
        loop_f, engine_f = imram_flops(k, d, cl[:n_c], steps=3)
        print(
            f"\nIMRAM bound: on its {n_i} x {n_c} pairs the loop baseline does "
            f"{n_i * loop_f / 1e9:.0f} GFLOP (three MDUs per direction on every pair, as the "
            f"reference), the engine {n_i * engine_f / 1e9:.0f} GFLOP (one per-pair MDU query "
            f"half per direction; the rest per caption / per image or mixed by the attention "
            f"weights): at equal GEMM efficiency no exact engine is more than "
            f"{loop_f / engine_f:.1f}x faster."
        )

    if not a.no_train:
        batch = 16 if a.quick else 128
        ours = run_child(["ours", str(batch), str(k), str(d)], a.threads)
        loop = run_child(["loop", str(batch), str(k), str(d)], a.threads)
        print(
            f"\ntraining step (SCAN t2i, batch {batch}, forward + backward of similarity + "
            f"loss):\n  engine (autograd, Gram identity) {ours['seconds']:.2f} s, peak "
            f"+{ours['peak_mb']:.0f} MB\n  loop baseline                    {loop['seconds']:.2f}"
            f" s, peak +{loop['peak_mb']:.0f} MB\n  -> {loop['seconds'] / ours['seconds']:.1f}x "
            f"faster, {ours['peak_mb'] / max(loop['peak_mb'], 1e-9):.2f} of the peak memory "
            "(target: >= 5x faster, <= 0.33 of the memory)"
        )

    if not a.no_rss:
        res = run_child(
            ["rss", str(a.rss_images), str(a.rss_captions), str(k), str(a.rss_dim), "256"],
            a.threads,
        )
        print(
            f"\npeak RSS: scoring {a.rss_images} x {a.rss_captions} (SCAN t2i, d={a.rss_dim}, "
            f"budget 256 MB) in {res['seconds']:.1f} s: RSS grew {res['growth_mb']:.0f} MB = "
            f"output matrix {res['output_mb']:.0f} MB + {res['growth_mb'] - res['output_mb']:.0f}"
            f" MB workspace (inputs {res['inputs_mb']:.0f} MB, allocated before)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
