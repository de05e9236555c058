"""``itm-prepare``: build a vocabulary, convert precomp data to HDF5, check a data directory,
build PFAN position rows.

    itm-prepare vocab DIR [--threshold 4] [--splits train] [--out FILE]
    itm-prepare h5 DIR [--out OUT_DIR] [--float16] [--splits train dev test testall] [--force]
    itm-prepare check DIR [--format auto|npy|h5] [--vocab FILE]
    itm-prepare convert AUTHORS_CHECKPOINT --out FILE [--force]
    itm-prepare pfan-positions DIR [--splits ...] [--grid 16] [--top-blocks 15] [--force]

``vocab`` counts the words of the chosen splits' captions (the project's tokenizer, see
:func:`itm.data.vocab.tokenize`) and keeps those seen at least ``--threshold`` times (SCAN: 4,
on train + dev), writing a SCAN-format ``<DIR name>_vocab.json`` into DIR by default.

``h5`` writes ``OUT_DIR/<split>.h5`` per split present in DIR (see :mod:`itm.data.stores.hdf5`),
each atomically, and copies DIR's ``*_vocab.json`` along when OUT_DIR differs from DIR.

``check`` validates DIR as training would (every problem named with its file) and prints a
summary per split.

``convert`` rewrites a checkpoint of the authors' code (SCAN, BFAN, IMRAM, CHAN, VSE-infinity,
SGRAF) as a regular itm checkpoint (:mod:`itm.released.convert`), listing the options mapped and
those without an itm counterpart.

``pfan-positions`` writes ``<split>_positions.npy`` (float64 [N, K, 2T + 1]: PFAN's block indices,
overlap weights and area per region, :func:`itm.data.pfan_positions`) from ``<split>_boxes.npy``
[N, K, 4] (x1, y1, x2, y2 in pixels) and ``<split>_img_sizes.npy`` [N, 2] (height, width), for
every split that has boxes. A ``<split>_boxes.npy`` with 30 or 31 columns is the PFAN authors'
release of positions under that name: it is reported and left alone (the data layer reads it as
positions as it is).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from itm.data.splits import SPLITS
from itm.data.validation import DataError
from itm.io import atomic_path

__all__ = ["main"]


def _captions_of(root: Path, split: str) -> tuple[list[str], Path]:
    h5 = root / f"{split}.h5"
    txt = root / f"{split}_caps.txt"
    if txt.is_file() or not h5.is_file():
        from itm.data.validation import read_text_lines

        return read_text_lines(txt, "caption"), txt
    from itm.data.stores.hdf5 import open_h5_split

    return open_h5_split(h5, check_finite=False, split=split).captions, h5


def _cmd_vocab(args: argparse.Namespace) -> int:
    from itm.data.vocab import Vocabulary

    root = Path(args.root)
    if not root.is_dir():
        raise DataError(root, "data directory does not exist")
    captions: list[str] = []
    for split in args.splits:
        caps, path = _captions_of(root, split)
        captions += caps
        print(f"{path}: {len(caps)} captions")
    out = Path(args.out) if args.out else root / f"{root.resolve().name}_vocab.json"
    if out.exists() and not args.force:
        raise DataError(out, "already exists (pass --force to overwrite)")
    vocab = Vocabulary.build(captions, threshold=args.threshold)
    vocab.to_json(out)
    print(f"wrote {out}: {len(vocab)} ids (words seen >= {args.threshold} times, 4 special)")
    return 0


def _cmd_h5(args: argparse.Namespace) -> int:
    from itm.data.stores.hdf5 import convert_split

    root = Path(args.root)
    if not root.is_dir():
        raise DataError(root, "data directory does not exist")
    out_dir = Path(args.out) if args.out else root
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = args.splits or [s for s in SPLITS if (root / f"{s}_ims.npy").is_file()]
    if not splits:
        raise DataError(root, "no <split>_ims.npy files: not a precomp directory")
    for split in splits:
        dest = out_dir / f"{split}.h5"
        if dest.exists() and not args.force:
            raise DataError(dest, "already exists (pass --force to overwrite)")
        t0 = time.perf_counter()
        convert_split(root, split, dest, float16=args.float16)
        size = dest.stat().st_size / 2**20
        print(f"wrote {dest} ({size:.1f} MiB, {time.perf_counter() - t0:.1f} s)", flush=True)
    if out_dir.resolve() != root.resolve():
        for vocab in sorted(root.glob("*_vocab.json")):
            dest = out_dir / vocab.name
            with atomic_path(dest) as tmp:
                shutil.copyfile(vocab, tmp)
            print(f"copied {vocab.name} to {out_dir}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from itm.data.precomp import PrecompDataModule

    root = Path(args.root)
    splits = args.splits or [
        s for s in SPLITS if (root / f"{s}_ims.npy").is_file() or (root / f"{s}.h5").is_file()
    ]
    if not splits:
        raise DataError(root, "no <split>_ims.npy or <split>.h5 files")
    dm = PrecompDataModule(
        root,
        format=args.format,
        vocab_path=args.vocab,
        n_dev=None,
        splits=splits,
        unknown_captions="warn",
    )
    dm.validate()
    rows = [dm.get_split(s).summary() for s in splits]
    cols = ["split", "format", "images", "captions", "caps/img", "regions", "dim", "dtype"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    print(f"vocabulary: {getattr(dm.vocab, 'path', '?')} ({len(dm.vocab)} ids)")
    print("ok")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from itm.released.convert import main as convert_main

    return convert_main(args)


def _cmd_pfan_positions(args: argparse.Namespace) -> int:
    import numpy as np

    from itm.data.pfan import pfan_positions, position_columns
    from itm.data.stores.npy import split_files
    from itm.data.validation import read_npy_header

    root = Path(args.root)
    if not root.is_dir():
        raise DataError(root, "data directory does not exist")
    splits = args.splits or [s for s in SPLITS if split_files(root, s)["boxes"].is_file()]
    if not splits:
        raise DataError(root, "no <split>_boxes.npy files: nothing to build positions from")
    for split in splits:
        files = split_files(root, split)
        info = read_npy_header(files["boxes"], ndim=3)
        try:
            kind = position_columns(info.shape[2], args.top_blocks)
        except ValueError as err:
            raise DataError(files["boxes"], str(err)) from None
        if kind == "positions":
            print(
                f"{files['boxes']}: {info.shape[2]} columns per region, i.e. PFAN position rows "
                "(the authors' release), not boxes: nothing to build, itm reads this file as "
                f"positions as it is (its rows follow the authors' image order; match them to "
                f"{split}_ims.npy by ids or captions)",
                flush=True,
            )
            continue
        dest = files["positions"]
        if dest.exists() and not args.force:
            raise DataError(dest, "already exists (pass --force to overwrite)")
        if not files["img_sizes"].is_file():
            raise DataError(
                files["img_sizes"],
                f"file not found: positions need each image's height and width, [{info.shape[0]}"
                ", 2] (pixels, the frame of the boxes)",
            )
        sizes = np.load(files["img_sizes"])
        if sizes.shape != (info.shape[0], 2):
            raise DataError(
                files["img_sizes"],
                f"shape {sizes.shape}; expected [{info.shape[0]}, 2] (height, width of each image "
                f"of {files['boxes'].name})",
            )
        boxes = np.load(files["boxes"], mmap_mode="r")
        t0 = time.perf_counter()
        width = 2 * args.top_blocks + 1
        with atomic_path(dest) as tmp:
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.float64, shape=(*info.shape[:2], width)
            )
            for start in range(0, info.shape[0], 1024):
                stop = min(start + 1024, info.shape[0])
                try:
                    out[start:stop] = pfan_positions(
                        boxes[start:stop], sizes[start:stop], args.grid, args.top_blocks
                    )
                except ValueError as err:
                    raise DataError(files["boxes"], f"images {start}..{stop - 1}: {err}") from None
            out.flush()
            del out
        print(
            f"wrote {dest} [{info.shape[0]}, {info.shape[1]}, {width}] "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itm-prepare", description="Prepare image-text matching data for itm."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("vocab", help="build a SCAN-format vocabulary from captions")
    p.add_argument("root", help="data directory (precomp layout or HDF5 store)")
    p.add_argument("--threshold", type=int, default=4, help="minimum word count (default 4)")
    p.add_argument(
        "--splits", nargs="+", default=["train"], choices=SPLITS, help="caption splits to count"
    )
    p.add_argument("--out", help="output file (default DIR/<DIR name>_vocab.json)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_vocab)

    p = sub.add_parser("h5", help="convert a precomp directory into the HDF5 store")
    p.add_argument("root", help="precomp directory (<split>_ims.npy, <split>_caps.txt)")
    p.add_argument("--out", help="output directory (default: DIR itself)")
    p.add_argument("--float16", action="store_true", help="store features as float16")
    p.add_argument("--splits", nargs="+", choices=SPLITS, help="splits (default: all present)")
    p.add_argument("--force", action="store_true", help="overwrite existing .h5 files")
    p.set_defaults(func=_cmd_h5)

    p = sub.add_parser("check", help="validate a data directory as training would")
    p.add_argument("root", help="data directory")
    p.add_argument("--format", default="auto", choices=["auto", "npy", "h5"])
    p.add_argument("--vocab", help="vocabulary file (default: found next to the data)")
    p.add_argument("--splits", nargs="+", choices=SPLITS, help="splits (default: all present)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("convert", help="rewrite an authors' checkpoint as an itm checkpoint")
    p.add_argument("checkpoint", help="the authors' file (e.g. model_best.pth.tar)")
    p.add_argument("--out", required=True, help="the itm checkpoint to write (e.g. model.ckpt)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "pfan-positions",
        help="build PFAN position rows (<split>_positions.npy) from boxes and image sizes",
    )
    p.add_argument("root", help="precomp directory (<split>_boxes.npy, <split>_img_sizes.npy)")
    p.add_argument("--splits", nargs="+", choices=SPLITS, help="splits (default: all with boxes)")
    p.add_argument("--grid", type=int, default=16, help="grid size G (default 16)")
    p.add_argument("--top-blocks", type=int, default=15, help="blocks per region T (default 15)")
    p.add_argument("--force", action="store_true", help="overwrite existing positions files")
    p.set_defaults(func=_cmd_pfan_positions)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``itm-prepare``; returns the exit status (errors: 2, message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (DataError, ValueError, FileExistsError) as e:
        print(f"itm-prepare {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
