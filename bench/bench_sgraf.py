"""SGRAF (SGR, SAF) scoring and training against the authors' per-caption loop and their own floor.

SGRAF is FLOP-bound: the ``d -> m`` projection of every word's squared difference cannot be
factored. Its floor is the flops of the products the method cannot avoid, per pair with ``n``
words (``K`` regions, ``d`` embed, ``m`` sim_dim, ``S`` sgr_step):

- attention: ``2 K n d`` (region-word scores) + ``2 K n d`` (the attended vectors);
- local projection ``2 n d m`` and global projection ``2 d m``; the read-out ``2 m``;
- SGR: ``S - 1`` full steps of ``4 (n+1) m^2`` (the folded edge map ``A s_p + c``, and the
  graph Linear) + ``4 (n+1)^2 m`` (edge logits, mixing), and a last step on node 0 only:
  ``4 m^2 + 4 (n+1) m``;
- SAF: ``4 (n+1) m`` (attention logits, weighted sum).

(The spec's count, methods.md section 10, keeps both query and key Linears and every node in
the last step: ``S (6 (n+1) m^2 + 4 (n+1)^2 m)`` for SGR; it is printed beside ours.) The floor's
time is those flops at the GEMM rate measured in this run on the method's dominant product
(``[B2*n, d] x [d, m]`` with 128 captions of 14 words), never flattered: the best rate seen.

Rows: ``sgr`` / ``saf`` scoring (``Similarity.score_matrix``, eval mode, float32) vs the loop
baseline of ``bench/baselines.py`` (``sgraf``: the authors' ``EncoderSimilarity`` structure, a
Python loop over captions, image shards of 100 as their evaluation) and vs the floor; training:
one step (forward + hinge loss + backward of the head on a B x B batch) with its peak tensor
memory, ours (caption chunks under checkpointing beyond ``train_block_mb``) vs the loop.

    python bench/run.py sgraf            # or: make bench BENCH=sgraf
    python bench/bench_sgraf.py --quick  # small shapes (a smoke test)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from functools import partial
from pathlib import Path

import baselines
import torch
from torch import Tensor

from itm.models import Similarity
from itm.models.align.sgraf import SGRAF

HERE = Path(__file__).resolve().parent
if str(HERE.parent / "tests") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "tests"))

from conformance import PeakMemory  # noqa: E402  (the conformance suite's workspace meter)

CLOCK = time.perf_counter
TARGET = "<= 1.5x floor (stretch 1.2x), faster than the loop"


def workload(n_img: int, n_cap: int, k: int, d: int, device, seed: int = 0, lmin=8, lmax=20):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, k, d, generator=g), dim=-1)
    lens = torch.randint(lmin, lmax + 1, (n_cap,), generator=g)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, lmax, d, generator=g), dim=-1)
    cap[torch.arange(lmax)[None, :] >= lens[:, None]] = 3.0  # garbage padding
    return img.to(device), torch.full((n_img,), k, device=device), cap.to(device), lens.to(device)


def floor_flops(module: str, k: int, d: int, m: int, steps: int, lens: Tensor) -> float:
    """Per image, summed over the captions ``lens``: the unavoidable flops (module docstring)."""
    n = lens.double()
    total = 4 * k * n * d + 2 * n * d * m + 2 * d * m + 2 * m
    if module == "sgr":
        full = 4 * (n + 1) * m * m + 4 * (n + 1) ** 2 * m
        total = total + (steps - 1) * full + 4 * m * m + 4 * (n + 1) * m
    else:
        total = total + 4 * (n + 1) * m
    return float(total.sum())


def spec_flops(module: str, k: int, d: int, m: int, steps: int, n: int = 14) -> float:
    """methods.md section 10's per-pair count (at n = 14)."""
    base = 2 * n * d * m + 4 * k * n * d + 2 * d * m
    if module == "sgr":
        return base + steps * (6 * (n + 1) * m * m + 4 * (n + 1) ** 2 * m)
    return base + 4 * (n + 1) * m  # SAF's extra terms are tiny


class GemmRate:
    """Best GFLOP/s of ``[rows, d] x [d, m]`` (the local projection of 128 captions x 14
    words), measured repeatedly in the run."""

    def __init__(self, d: int, m: int, device, rows: int = 128 * 14) -> None:
        self.a = torch.randn(rows, d, device=device)
        self.b = torch.randn(d, m, device=device)
        self.out = torch.empty(rows, m, device=device)
        self.flops = 2.0 * rows * d * m
        self.best = 0.0
        self.device = device

    def measure(self, reps: int = 20) -> float:
        torch.mm(self.a, self.b, out=self.out)
        for _ in range(reps):
            _sync(self.device)
            t0 = CLOCK()
            for _ in range(4):
                torch.mm(self.a, self.b, out=self.out)
            _sync(self.device)
            self.best = max(self.best, 4 * self.flops / max(CLOCK() - t0, 1e-9))
        return self.best


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, reps: int, device) -> float:
    best = float("inf")
    for _ in range(reps):
        gc.collect()
        _sync(device)
        t0 = CLOCK()
        fn()
        _sync(device)
        best = min(best, CLOCK() - t0)
    return best


def peak_mb(fn, device) -> float:
    """Peak tensor memory of ``fn()`` in MB (CUDA: the allocator's peak; CPU: PeakMemory)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with PeakMemory() as mem:
        fn()
    return mem.peak / 2**20


def loop_scores(head, img, cap, lens, shard: int = 100) -> Tensor:
    """The loop baseline in the authors' evaluation shards of 100 images."""
    return torch.cat(
        [baselines.sgraf(img[i : i + shard], cap, lens, head) for i in range(0, len(img), shard)]
    )


def train_step(head, img, cap, lens, ours: bool):
    """Forward (B x B scores), the hinge loss with hardest negatives, backward."""
    mask_i = torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)
    mask_c = torch.arange(cap.shape[1], device=cap.device)[None] < lens[:, None]

    def step() -> None:
        head.zero_grad(set_to_none=True)
        x = img.clone().requires_grad_(True)
        y = cap.clone().requires_grad_(True)
        scores = head(x, mask_i, y, mask_c) if ours else baselines.sgraf(x, y, lens, head)
        baselines.contrastive_loss(scores.cpu() if scores.is_cuda else scores).backward()

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--captions", type=int, default=500)
    p.add_argument("--loop-captions", type=int, default=100, help="captions the loop is timed on")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--sim-dim", type=int, default=256)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--budget-mb", type=float, default=256)
    p.add_argument("--batch", type=int, default=128, help="training batch B (B x B pairs)")
    p.add_argument("--train-block-mb", type=float, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--train-reps", type=int, default=1, help="timed training steps per row")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-train", action="store_true")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time (use with --threads 1 on a loaded machine)",
    )
    a = p.parse_args([] if argv is None else argv)
    if a.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if a.quick:
        a.images, a.captions, a.loop_captions, a.dim, a.sim_dim = 12, 40, 20, 64, 32
        a.batch, a.reps, a.train_block_mb = 16, 1, 1.0
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    k, d, m, steps = a.regions, a.dim, a.sim_dim, 3
    print(
        f"torch {torch.__version__}, {dev}, {torch.get_num_threads()} threads, float32, "
        f"{'process CPU' if a.cpu_time else 'wall'} time; "
        f"{a.images} images x {a.captions} captions (8..20 words), K={k}, d={d}, m={m}"
    )
    rate = GemmRate(d, m, dev)
    rate.measure()
    img, il, cap, cl = workload(a.images, a.captions, k, d, dev)
    rows = []
    torch.manual_seed(0)
    for module in ("sgr", "saf"):
        head = SGRAF(module, embed_size=d, sim_dim=m, sgr_step=steps, num_region=k).to(dev)
        head.eval()
        sim = Similarity(head, None)
        with torch.no_grad():
            # the engine against the loop on a small slice (same numbers)
            nl = min(a.loop_captions, a.captions)
            ref = loop_scores(head, img, cap[:nl], cl[:nl])
            got = sim.score_matrix(img, il, cap[:nl], cl[:nl], max_block_mb=a.budget_mb)
            err = float((got - ref).abs().max())
            t_eng = best_time(partial(sim.score_matrix, img, il, cap, cl, a.budget_mb), a.reps, dev)
            rate.measure()
            t_loop = best_time(partial(loop_scores, head, img, cap[:nl], cl[:nl]), a.reps, dev)
            rate.measure()
        pairs = a.images * a.captions
        flops = a.images * floor_flops(module, k, d, m, steps, cl.cpu())
        loop_pps = a.images * nl / t_loop
        rows.append((module, pairs, t_eng, flops, loop_pps, err))
        print(f"  {module}: engine {t_eng:.2f} s, loop {t_loop:.2f} s on {nl} captions", flush=True)
    print(
        f"\nGEMM rate (best of this run, [{128 * 14}, {d}] x [{d}, {m}]): "
        f"{rate.best / 1e9:.0f} GFLOP/s"
    )
    hdr = (
        f"{'row':<6}{'pairs':>9}{'engine s':>10}{'pairs/s':>11}{'floor pairs/s':>15}"
        f"{'x floor':>9}{'loop pairs/s':>14}{'vs loop':>9}{'|eng-loop|':>12}  target"
    )
    print(hdr + "\n" + "-" * (len(hdr) + 20))
    for module, pairs, t_eng, flops, loop_pps, err in rows:
        floor = flops / rate.best
        print(
            f"{module:<6}{pairs:>9,}{t_eng:>10.2f}{pairs / t_eng:>11,.0f}{pairs / floor:>15,.0f}"
            f"{t_eng / floor:>8.2f}x{loop_pps:>14,.0f}{pairs / t_eng / loop_pps:>8.1f}x"
            f"{err:>12.1e}  {TARGET}"
        )
    n_mean = float(cl.double().mean())
    for module, *_ in rows:
        ours = floor_flops(module, k, d, m, steps, torch.tensor([14])) / 1e6
        print(
            f"  {module} floor at n=14: {ours:.1f} MFLOP/pair (spec's count "
            f"{spec_flops(module, k, d, m, steps) / 1e6:.1f}); mean n here {n_mean:.1f}"
        )
    if a.no_train:
        return
    print(f"\ntraining step (B={a.batch}: {a.batch**2:,} pairs; forward + hinge + backward):")
    bimg, _, bcap, bcl = workload(a.batch, a.batch, k, d, dev, seed=1)
    hdr = f"{'row':<6}{'ours s':>9}{'loop s':>9}{'x loop':>9}{'ours MB':>10}{'loop MB':>10}"
    lines = []
    for module in ("sgr", "saf"):
        torch.manual_seed(0)
        head = SGRAF(
            module, embed_size=d, sim_dim=m, num_region=k, train_block_mb=a.train_block_mb
        ).to(dev)
        head.train()
        ours, loop = (train_step(head, bimg, bcap, bcl, flag) for flag in (True, False))
        ours(), loop()  # warm-up
        t_ours, t_loop = best_time(ours, a.train_reps, dev), best_time(loop, a.train_reps, dev)
        mb_ours, mb_loop = peak_mb(ours, dev), peak_mb(loop, dev)
        lines.append(
            f"{module:<6}{t_ours:>9.2f}{t_loop:>9.2f}{t_ours / t_loop:>8.2f}x"
            f"{mb_ours:>10.0f}{mb_loop:>10.0f}"
        )
        print(f"  {module}: done", flush=True)
    print(hdr + "\n" + "-" * len(hdr))
    print("\n".join(lines))
    print(
        f"(ours: caption chunks under checkpointing beyond train_block_mb={a.train_block_mb:g} "
        "MB; the loop keeps every caption's activations for backward)"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main(sys.argv[1:])
