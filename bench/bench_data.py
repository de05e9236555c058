"""Data loading benchmark: loader throughput per store, and peak RSS over a > 2 GB feature file.

    python bench/run.py data            # or: make bench BENCH=data
    python bench/bench_data.py --images 1000 --rss-gb 2.2

Part 1 writes one dataset (36 x 2048 float32 regions, 5 captions per image) as precomp npy and as
HDF5 float32 / float16, then times the training loader (shuffled caption-image pairs, batch 128,
``num_workers=0``, page cache warm) over each store and over in-memory arrays.

Part 2 writes a feature file larger than 2 GB and, in a fresh subprocess per reader, iterates
every image once, reporting the process's peak RSS (``VmHWM``) next to the file size: itm's
memory-mapped store (pages released as it goes) and, for reference, a plain ``np.load(...,
mmap_mode="r")`` loop. Skipped (with the reason printed) if the disk has < 6 GB free.
Everything is written to a temporary directory that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REGIONS, DIM, CPI = 36, 2048, 5
WORDS = [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "red",
    "blue",
    "small",
    "big",
    "on",
    "with",
    "in",
    "the",
    "street",
    "grass",
    "ball",
    "car",
]


def _captions(n_images: int, rng: np.random.Generator) -> list[str]:
    lens = rng.integers(6, 14, size=n_images * CPI)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in lens]


def _write_npy(path: Path, n_images: int, rng: np.random.Generator, block: int = 512) -> None:
    """[n, 36, 2048] float32 written block by block (bounded memory)."""
    pattern = rng.standard_normal((block, REGIONS, DIM)).astype(np.float32)
    arr = np.lib.format.open_memmap(path, "w+", np.float32, (n_images, REGIONS, DIM))
    for start in range(0, n_images, block):
        stop = min(n_images, start + block)
        arr[start:stop] = pattern[: stop - start] + np.float32(start)
    arr.flush()
    del arr


def _write_dataset(root: Path, n_images: int, rng: np.random.Generator) -> None:
    from itm.data import Vocabulary

    root.mkdir(parents=True, exist_ok=True)
    caps = _captions(n_images, rng)
    _write_npy(root / "train_ims.npy", n_images, rng)
    (root / "train_caps.txt").write_text("\n".join(caps) + "\n")
    Vocabulary.build(caps, threshold=1).to_json(root / "bench_vocab.json")


def _throughput(store, vocab, n_batches: int, batch_size: int = 128) -> float:
    from torch.utils.data import DataLoader

    from itm.data import CaptionPairDataset, collate_pairs

    loader = DataLoader(
        CaptionPairDataset(store, vocab),
        batch_size=batch_size,
        shuffle=True,
        num_workers=0,
        collate_fn=collate_pairs,
    )
    it = iter(loader)
    next(it)  # warm-up
    t0 = time.perf_counter()
    n = 0
    for _ in range(n_batches):
        try:
            n += len(next(it)["img_ids"])
        except StopIteration:
            it = iter(loader)
    return n / (time.perf_counter() - t0)


def part_throughput(tmp: Path, n_images: int, n_batches: int) -> list[tuple[str, str, str]]:
    from itm.data import ArraySplit, PrecompDataModule
    from itm.data.prepare import main as prepare

    rng = np.random.default_rng(0)
    root = tmp / "throughput"
    t0 = time.perf_counter()
    _write_dataset(root, n_images, rng)
    for name, extra in (("h5_f32", []), ("h5_f16", ["--float16"])):
        with open(os.devnull, "w") as devnull:
            old, sys.stdout = sys.stdout, devnull
            try:
                assert prepare(["h5", str(root), "--out", str(tmp / name), *extra]) == 0
            finally:
                sys.stdout = old
    print(
        f"  wrote {n_images} images x {REGIONS} x {DIM} in 3 stores ({time.perf_counter() - t0:.0f} s)"
    )

    def dm(path: Path, fmt: str) -> PrecompDataModule:
        return PrecompDataModule(
            path, format=fmt, splits=["train"], vocab_path=root / "bench_vocab.json"
        )

    stores = {
        "npy (memory map)": dm(root, "npy"),
        "HDF5 float32": dm(tmp / "h5_f32", "h5"),
        "HDF5 float16": dm(tmp / "h5_f16", "h5"),
    }
    vocab = stores["npy (memory map)"].vocab
    train = stores["npy (memory map)"].get_split("train")
    in_memory = ArraySplit(np.load(root / "train_ims.npy"), train.captions, train.cap_to_img)
    rows = []
    sizes = {
        "npy (memory map)": (root / "train_ims.npy").stat().st_size,
        "HDF5 float32": (tmp / "h5_f32" / "train.h5").stat().st_size,
        "HDF5 float16": (tmp / "h5_f16" / "train.h5").stat().st_size,
        "in-memory arrays": in_memory.images.nbytes,
    }
    results = {}
    for name, store in [
        *((k, v.get_split("train")) for k, v in stores.items()),
        ("in-memory arrays", in_memory),
    ]:
        _throughput(store, vocab, 2)  # warm the page cache
        results[name] = _throughput(store, vocab, n_batches)
    base = results["in-memory arrays"]
    for name, rate in results.items():
        rows.append((name, f"{sizes[name] / 2**20:,.0f} MiB", f"{rate:,.0f}", f"{rate / base:.2f}"))
    return rows


_CHILD = r"""
import json, sys, time
import numpy as np

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
mode, root = sys.argv[1], sys.argv[2]
import torch  # the baseline includes the usual imports
from itm.data import PrecompDataModule, ImageDataset, collate_images
t0 = time.perf_counter()
if mode == "itm":
    dm = PrecompDataModule(root, splits=["train"], check_finite=True, eval_batch_size=128)
    dm.validate()  # includes the chunked NaN / inf scan of the whole file
    base = rss("VmRSS:")
    n = 0
    for batch in dm.eval_dataloaders("train")[0]:
        n += len(batch["img_ids"])
else:
    arr = np.load(root + "/train_ims.npy", mmap_mode="r")
    base = rss("VmRSS:")
    n = 0
    for i in range(0, len(arr), 128):
        x = torch.from_numpy(np.array(arr[i:i + 128], dtype=np.float32))
        n += len(x)
print(json.dumps({"images": n, "base": base, "peak": rss("VmHWM:"), "s": time.perf_counter() - t0}))
"""


def part_rss(tmp: Path, gb: float) -> list[tuple[str, ...]] | str:
    free = shutil.disk_usage(tmp).free
    if free < 6e9:
        return f"skipped: only {free / 1e9:.1f} GB free on {tmp} (needs 6 GB)"
    n_images = int(np.ceil(gb * 1e9 / (REGIONS * DIM * 4)))
    root = tmp / "big"
    t0 = time.perf_counter()
    _write_dataset(root, n_images, np.random.default_rng(1))
    size = (root / "train_ims.npy").stat().st_size
    print(
        f"  wrote {size / 1e9:.2f} GB feature file ({n_images} images, {time.perf_counter() - t0:.0f} s)"
    )
    rows = []
    for mode, label in (
        ("itm", "itm npy store (validate + iterate)"),
        ("plain", "plain np.load mmap loop"),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, mode, str(root)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        assert r["images"] == n_images
        rows.append(
            (
                label,
                f"{size / 2**20:,.0f} MiB",
                f"{r['base'] / 2**20:,.0f} MiB",
                f"{r['peak'] / 2**20:,.0f} MiB",
                f"{(r['peak'] - r['base']) / size:.1%}",
                f"{r['s']:.1f} s",
            )
        )
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_data", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images of the throughput set")
    parser.add_argument("--batches", type=int, default=30, help="timed batches of 128 per store")
    parser.add_argument("--rss-gb", type=float, default=2.2, help="size of the big file (GB)")
    parser.add_argument("--skip-rss", action="store_true", help="skip the big-file part")
    args = parser.parse_args(argv or [])  # bench/run.py passes None: the defaults
    import torch

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="itm_bench_data_"))
    try:
        print(
            f"loader throughput (train loader, batch 128, 0 workers, {REGIONS}x{DIM} float32 regions):"
        )
        rows = part_throughput(tmp, args.images, args.batches)
        print(_table(("store", "size", "samples/s", "vs in-memory"), rows))
        shutil.rmtree(tmp / "throughput", ignore_errors=True)
        for d in ("h5_f32", "h5_f16"):
            shutil.rmtree(tmp / d, ignore_errors=True)
        print(
            "\npeak RSS while iterating every image of a large feature file (fresh process each):"
        )
        if args.skip_rss:
            print("  skipped (--skip-rss)")
        else:
            res = part_rss(tmp, args.rss_gb)
            if isinstance(res, str):
                print("  " + res)
            else:
                print(
                    _table(("reader", "file", "RSS before", "peak RSS", "growth/file", "time"), res)
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
