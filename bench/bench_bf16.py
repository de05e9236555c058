"""bf16 vs fp32: scoring speed against BOTH matrix-product floors, a training step, and accuracy.

Scoring (the scoring bench's Flickr30K-shaped workload: 256 images x 36 regions against 1280
captions of 8..20 words, d = 1024): per head, ``Similarity.score_matrix`` in float32 and with
``precision="bf16"`` (the block's products in bfloat16, float32 accumulation; the exact
re-scoring of each row's and column's top 10 pairs included), each as a ratio to

- the fp32 floor: the head's product flops (SCAN / BFAN / CHAN: 2*K*L*d per pair over the
  real words; IMRAM: its engine's products, bench_scoring.imram_flops) at the float32 GEMM
  rate, and
- the bf16 floor: the same flops at the bfloat16 GEMM rate,

both rates measured in this run on the floor's product shape, (36*128, d) x (d, 14*128). The
"x paired" columns time the floor's products right before each engine timing (see
bench_scoring.py). Training: one SCAN t2i step (batch 128, forward + backward of the similarity
and the loss) in float32 and under bf16 autocast. Accuracy: a SCAN t2i model trained briefly on
the synthetic data scores its 200-image test split both ways; the largest score difference and
the difference of every recall figure are printed.

    python bench/run.py bf16                   # or: make bench BENCH=bf16
    python bench/bench_bf16.py --quick         # small shapes (a smoke test)
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_scoring as bs  # noqa: E402

from itm.models import ContrastiveLoss, Similarity  # noqa: E402
from itm.models.align import fused  # noqa: E402
from itm.models.align.bfan import BFAN  # noqa: E402
from itm.models.align.chan import CHAN  # noqa: E402
from itm.models.align.engine import BF16_EXACT_TOP  # noqa: E402
from itm.models.align.imram import IMRAM  # noqa: E402
from itm.models.align.scan import SCAN  # noqa: E402
from itm.models.pooling import AvgPool, LSEPool  # noqa: E402

TARGETS = {
    "scan_t2i": "bf16 <= 0.5x fp32 floor",
    "scan_i2t": "",
    "chan": "bf16 <= 0.5x fp32 floor",
    "bfan": "",
    "imram": "",
}


class Rate(bs.GemmRate):
    """The floor's product rate in ``dtype`` (the scoring bench's GemmRate, any dtype)."""

    def __init__(self, k: int, d: int, dtype: torch.dtype) -> None:
        super().__init__(k, d)
        self.a, self.b = self.a.to(dtype), self.b.to(dtype)
        self.out = self.out.to(dtype)


#: the slow heads are timed on a subset of the workload (as in bench_scoring.py)
SUBSETS = {"bfan": (128, 256), "imram": (16, 64)}


def bf16_heads(d: int) -> dict[str, Similarity]:
    torch.manual_seed(0)
    return {
        "scan_t2i": Similarity(SCAN("t2i", 9.0), LSEPool(6.0)),
        "scan_i2t": Similarity(SCAN("i2t", 4.0), AvgPool()),
        "chan": Similarity(CHAN("t2i"), LSEPool(10.0, rescale=False)),
        "bfan": Similarity(BFAN("equal", 20.0, "both"), None),
        "imram": Similarity(IMRAM("both", 3, 9.0, embed_size=d), AvgPool()),
    }


def training_step_seconds(batch: int, k: int, d: int, autocast: bool, reps: int = 2) -> float:
    img, il, cap, cl = bs.workload(batch, batch, k, d, seed=2)
    img.requires_grad_(True)
    cap.requires_grad_(True)
    sim = Similarity(SCAN("t2i", 9.0), LSEPool(6.0))
    loss_fn = ContrastiveLoss(margin=0.2, max_violation=True)

    def step() -> None:
        img.grad = cap.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sims = sim(img, il, cap, cl).float()  # as ITMModule: the loss in float32
        loss_fn(sims).backward()

    step()
    return bs.best_time(step, reps)


def accuracy(quick: bool) -> str:
    """Train SCAN t2i briefly on the synthetic data; compare fp32 and bf16 test matrices."""
    tests = HERE.parent / "tests"
    if str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    import trained  # the tests' helper: a seeded short training on the synthetic data
    from itm.metrics import recall_at_k

    if not quick:
        trained.BUDGET = (
            "model.embed_size=64",
            "data.n_train=2000",
            "data.batch_size=128",
            "model.optimizer.lr=1e-3",
        )
        trained.EPOCHS = 4
    model, dm = trained.trained(("model/align=scan",))
    lines = []
    fp32 = trained.score_split(model, dm)
    for top in (0, BF16_EXACT_TOP):
        with torch.no_grad():
            bf16 = trained.score_split(model, dm, precision="bf16", exact_top=top)
        r32, r16 = recall_at_k(fp32), recall_at_k(bf16)
        keys = [f"{s}_r{k}" for s in ("i2t", "t2i") for k in (1, 5, 10)]
        diffs = ", ".join(f"{key} {r16[key] - r32[key]:+.2f}" for key in keys)
        lines.append(
            f"  exact_top={top:<3} largest score difference "
            f"{float((fp32 - bf16).abs().max()):.2e} (scores up to {float(fp32.abs().max()):.2f});"
            f" rsum fp32 {r32['rsum']:.2f} bf16 {r16['rsum']:.2f}; {diffs}"
        )
    return (
        f"accuracy (SCAN t2i trained on the synthetic data, {fp32.shape[0]} x {fp32.shape[1]} "
        "test matrix):\n" + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--captions", type=int, default=1280)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--heads", default="", help="comma-separated subset of the rows")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-accuracy", action="store_true")
    a = p.parse_args([] if argv is None else argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.images, a.captions, a.dim, a.reps = 32, 64, 128, 1
    k, d = a.regions, a.dim
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, wall time; workload "
        f"{a.images} images x {a.captions} captions, K={k}, L=8..20, d={d}; fused kernel "
        + ("used" if fused.load() is not None and fused.enabled() else "NOT used")
    )
    img, il, cap, cl = bs.workload(a.images, a.captions, k, d)
    r32, r16 = Rate(k, d, torch.float32), Rate(k, d, torch.bfloat16)
    r32.measure()
    r16.measure()
    chosen = {h for h in a.heads.split(",") if h}
    rows = []
    for name, sim in bf16_heads(d).items():
        if chosen and name not in chosen:
            continue
        n_i, n_c = (
            (min(a.images, 128), min(a.captions, 256)) if name == "bfan" else (a.images, a.captions)
        )
        im, ill, ca, cll = img[:n_i], il[:n_i], cap[:n_c], cl[:n_c]
        flops = 2 * k * int(cll.sum()) * d * n_i  # the region-word scores
        if name == "imram":  # its engine's products (bench_scoring.imram_flops)
            flops = n_i * bs.imram_flops(k, d, cll, steps=3)[1]
        out = {}
        for key, precision, top, rate in (
            ("fp32", "fp32", 0, r32),
            ("bf16", "bf16", 0, r16),
            ("bf16+exact", "bf16", BF16_EXACT_TOP, r16),
        ):
            fn = partial(sim.score_matrix, im, ill, ca, cll, precision=precision, exact_top=top)
            with torch.no_grad():
                out[key] = bs.paired_times(fn, a.reps, partial(rate.floor_time, flops))
            r32.measure()
            r16.measure()
        rows.append((name, n_i * n_c, flops, out))
        print(
            f"  {name}: fp32 {out['fp32'][0]:.2f} s, bf16 {out['bf16'][0]:.2f} s, bf16 with the "
            f"exact top {BF16_EXACT_TOP} {out['bf16+exact'][0]:.2f} s",
            flush=True,
        )
    print(
        f"\nGEMM rates (best of this run, the floor's shape): fp32 {r32.best / 1e9:.0f}, "
        f"bf16 {r16.best / 1e9:.0f} GFLOP/s ({r16.best / r32.best:.1f}x). Every cell: engine "
        "time / floor time (x floor: at the best rates; x paired: median against the floor's "
        "products run beside each timing)."
    )
    hdr = (
        f"{'head':<10}{'pairs':>8}{'fp32 s':>8}{'bf16 s':>8}{'+exact s':>9}{'speed-up':>9}"
        f"{'fp32/fp32fl':>12}{'bf16/fp32fl':>12}{'bf16/bf16fl':>12}{'bf16 paired':>12}"
        f"{'+exact/fp32fl':>14}  target"
    )
    print(hdr + "\n" + "-" * (len(hdr) + 26))
    for name, pairs, flops, out in rows:
        t32, t16, tex = out["fp32"][0], out["bf16"][0], out["bf16+exact"][0]
        f32, f16 = flops / r32.best, flops / r16.best
        print(
            f"{name:<10}{pairs:>8}{t32:>8.2f}{t16:>8.2f}{tex:>9.2f}{t32 / t16:>8.1f}x"
            f"{t32 / f32:>11.2f}x{t16 / f32:>11.2f}x{t16 / f16:>11.2f}x"
            f"{out['bf16'][1]:>11.2f}x{tex / f32:>13.2f}x  {TARGETS[name]}"
        )
    print(
        "  (bf16: the block products in bfloat16; +exact: also the top "
        f"{BF16_EXACT_TOP} of every row and column re-scored in float32, the default of "
        "eval.precision=bf16; bf16/bf16fl: the bf16 engine against its own floor; bf16 paired: "
        "against the bf16 floor run beside it)"
    )
    if not a.no_train:
        batch = 16 if a.quick else 128
        t32 = training_step_seconds(batch, k, d, autocast=False)
        t16 = training_step_seconds(batch, k, d, autocast=True)
        print(
            f"\ntraining step (SCAN t2i, batch {batch}, forward + backward of similarity + loss): "
            f"fp32 {t32:.2f} s, bf16-mixed {t16:.2f} s -> {t32 / t16:.1f}x"
        )
    if not a.no_accuracy:
        t0 = time.perf_counter()
        print("\n" + accuracy(a.quick) + f"\n  ({time.perf_counter() - t0:.0f} s with training)")


if __name__ == "__main__":
    main(sys.argv[1:])
