"""The public "precomp" layout (SCAN's release) as a feature store, read as it is.

Per split (``train``, ``dev``, ``test``, ``testall``) a precomp directory holds:

- ``<split>_ims.npy``: float [N, K, D] region features (36 x 2048 in the public data),
  memory-mapped, never loaded whole (COCO train is ~33 GB);
- ``<split>_caps.txt``: UTF-8 captions, one per line, ``N * c`` lines, caption ``j`` belonging to
  image ``j // c`` (``c`` = 5 in Flickr30K / COCO; any whole multiple works);
- optional ``<split>_ids.txt`` (one image id per line) and ``<split>_boxes.npy`` [N, K, 4];
- optional ``<split>_positions.npy`` [N, K, 2T (+1)]: PFAN position rows (block indices, overlap
  weights, optional area; :mod:`itm.data.pfan`), written by ``itm-prepare pfan-positions DIR``
  from the boxes and ``<split>_img_sizes.npy``. The PFAN authors' released files are named
  ``<split>_boxes.npy`` but hold such rows (30 columns for Flickr30K, 31 for COCO): a boxes file
  of that width is read as positions, with a message.

:func:`open_npy_split` validates a split and returns a
:class:`~itm.data.stores.base.FeatureSplit` whose arrays are :class:`NpyImages` memory maps.
Imports numpy only.
"""

from __future__ import annotations

import logging
import mmap
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from itm.data.pfan import POSITION_WIDTHS
from itm.data.splits import SPLITS
from itm.data.stores.base import FeatureSplit, image_index
from itm.data.validation import (
    DataError,
    DataWarning,
    NpyInfo,
    captions_per_image,
    check_finite_rows,
    read_npy_header,
    read_text_lines,
)

__all__ = [
    "NpyImages",
    "check_split_name",
    "open_npy_split",
    "open_positions",
    "split_files",
]

log = logging.getLogger(__name__)


class NpyImages:
    """A read-only, memory-mapped view of the first ``limit`` rows of a ``.npy`` array.

    Array-like: ``shape``, ``dtype``, ``len()``, ``x[i]`` / ``x[i:j]`` (views of the map; copy what
    you keep). The map is opened lazily in each process (after a fork the child opens its own),
    and pickling carries only the path, so the object travels to DataLoader workers and
    ``ddp_spawn`` processes at no cost.

    Mapped pages count towards the process's resident set size even though they are only page
    cache; every ``release_bytes`` of reads the mapping is told ``MADV_DONTNEED`` (the pages stay
    in the page cache, the process stops holding them), so iterating a file far larger than
    memory keeps the RSS bounded.

    Args:
        path: the ``.npy`` file.
        limit: expose only the first ``limit`` rows (``None``: all).
        info: its header (read and checked when omitted).
        release_bytes: bytes read between two releases of the mapped pages.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        limit: int | None = None,
        info: NpyInfo | None = None,
        release_bytes: int = 256 << 20,
    ) -> None:
        self.path = Path(path)
        self.info = info if info is not None else read_npy_header(self.path)
        n = self.info.shape[0]
        self.n = n if limit is None else max(0, min(int(limit), n))
        self.release_bytes = int(release_bytes)
        self._row_bytes = int(np.prod(self.info.shape[1:])) * self.info.dtype.itemsize
        self._mm: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self._pid = -1
        self._since_release = 0

    # ---- array-like ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.info.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.info.dtype

    @property
    def ndim(self) -> int:
        return len(self.info.shape)

    def __len__(self) -> int:
        return self.n

    def _arr(self) -> np.ndarray:
        if self._array is None or self._pid != os.getpid():
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._array = np.ndarray(
                self.info.shape,
                dtype=self.info.dtype,
                buffer=self._mm,
                offset=self.info.offset,
                order="F" if self.info.fortran_order else "C",
            )
            self._pid = os.getpid()
            self._since_release = 0
        return self._array

    def __getitem__(self, idx: Any) -> np.ndarray:
        arr = self._arr()
        if isinstance(idx, (int, np.integer)):
            self._account(1)
            out = arr[image_index(idx, self.n)]
        elif isinstance(idx, slice):
            start, stop, step = idx.indices(self.n)
            out = arr[start:stop:step]
            self._account(len(out))
        else:
            raise TypeError(f"NpyImages supports int and slice indices, got {type(idx).__name__}")
        return out

    def _account(self, rows: int) -> None:
        self._since_release += rows * self._row_bytes
        if self._since_release >= self.release_bytes:
            self.release()

    def release(self) -> None:
        """Drop this process's mapped pages (they stay in the page cache; views stay valid: a
        later read faults the page in again)."""
        if self._mm is not None and self._pid == os.getpid() and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED)
        self._since_release = 0

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.array(self[:], dtype=dtype)

    # ---- pickling -----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_mm=None, _array=None, _pid=-1, _since_release=0)
        return state

    def __repr__(self) -> str:
        return f"NpyImages({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


def check_split_name(split: str, where: str | os.PathLike[str]) -> None:
    """A ``DataError`` naming ``where`` unless ``split`` is one of :data:`~itm.data.splits.SPLITS`."""
    if split not in SPLITS:
        raise DataError(where, f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def split_files(root: str | os.PathLike[str], split: str) -> dict[str, Path]:
    """Paths of a split's files in the precomp layout (whether they exist or not)."""
    root = Path(root)
    return {
        "images": root / f"{split}_ims.npy",
        "captions": root / f"{split}_caps.txt",
        "ids": root / f"{split}_ids.txt",
        "boxes": root / f"{split}_boxes.npy",
        "positions": root / f"{split}_positions.npy",
        "img_sizes": root / f"{split}_img_sizes.npy",
    }


def open_npy_split(
    root: str | os.PathLike[str],
    split: str,
    limit: int | None = None,
    check_finite: bool = True,
) -> FeatureSplit:
    """Open and validate a split of a precomp directory (features stay on disk).

    Args:
        root: the precomp directory.
        split: one of ``train dev test testall``.
        limit: keep only the first ``limit`` images and their captions (``None``: all).
        check_finite: scan the (kept) features for NaN / inf in bounded chunks.

    Raises:
        DataError: naming the file and the problem (missing file, wrong rank or dtype,
            truncated file, NaN/inf, caption count not a multiple of the image count, empty
            caption, non-UTF-8 text, ids or boxes not matching the images).
    """
    check_split_name(split, root)
    files = split_files(root, split)
    if not files["images"].is_file() or not files["captions"].is_file():
        missing = files["images"] if not files["images"].is_file() else files["captions"]
        present = sorted(p.name for p in Path(root).glob("*_ims.npy")) + sorted(
            p.name for p in Path(root).glob("*.h5")
        )
        raise DataError(
            missing,
            f"file not found (split {split!r} of the precomp layout needs {split}_ims.npy and "
            f"{split}_caps.txt; {root} has: {', '.join(present) or 'no feature files'})",
        )
    info = read_npy_header(files["images"], ndim=3)
    n_all = info.shape[0]
    captions = read_text_lines(files["captions"], "caption")
    cpi = captions_per_image(len(captions), n_all, files["captions"], files["images"])
    images = NpyImages(files["images"], limit=limit, info=info)
    n = len(images)
    captions = captions[: n * cpi]
    cap_to_img = np.repeat(np.arange(n, dtype=np.int64), cpi)

    ids = None
    if files["ids"].is_file():
        ids = read_text_lines(files["ids"], "image id")
        if len(ids) != n_all:
            raise DataError(
                files["ids"], f"{len(ids)} ids for {n_all} images in {files['images'].name}"
            )
        ids = ids[:n]
    boxes, positions, positions_file = None, None, None
    if files["boxes"].is_file():
        binfo = _region_file_header(files["boxes"], info, files["images"])
        if binfo.shape[2] == 4:
            boxes = NpyImages(files["boxes"], limit=limit, info=binfo)
        else:  # the PFAN authors' release: positions under the name of boxes
            positions, positions_file = (
                NpyImages(files["boxes"], limit=limit, info=binfo),
                files["boxes"],
            )
            msg = (
                f"{binfo.shape[2]} columns per region: PFAN position rows (the authors' "
                "release), not boxes (x1, y1, x2, y2); reading it as positions. Its rows follow "
                f"the authors' image order, which must match {files['images'].name} (match them "
                "by ids or captions)"
            )
            warnings.warn(f"{files['boxes']}: {msg}", DataWarning, stacklevel=2)
            log.warning("%s: %s", files["boxes"], msg)
    if files["positions"].is_file():
        positions, positions_file = (
            open_positions(
                files["positions"], (info.shape[0], info.shape[1]), files["images"], limit
            ),
            files["positions"],
        )
    if check_finite:
        check_finite_rows(images, files["images"], n)
        images.release()
    return FeatureSplit(
        name=split,
        images=images,
        captions=captions,
        cap_to_img=cap_to_img,
        images_file=files["images"],
        captions_file=files["captions"],
        ids=ids,
        boxes=boxes,
        format="npy",
        meta={"captions_per_image": cpi, "n_images_on_disk": n_all},
        positions=positions,
        positions_file=positions_file,
    )


def _region_file_header(path: Path, info: NpyInfo, images_file: Path) -> NpyInfo:
    """Header of a per-region file ``[N, K, W]`` (boxes or positions), checked against the
    features' ``[N, K]``; ``W`` must be 4 (boxes) or 30 / 31 (PFAN positions)."""
    binfo = read_npy_header(path, ndim=3)
    width = binfo.shape[2]
    if binfo.shape[:2] != info.shape[:2] or width not in (4, *POSITION_WIDTHS):
        raise DataError(
            path,
            f"shape {binfo.shape}; expected [{info.shape[0]}, {info.shape[1]}, 4] (boxes x1, y1, "
            f"x2, y2) or [{info.shape[0]}, {info.shape[1]}, 30 | 31] (PFAN positions) to match "
            f"{images_file.name}",
        )
    return binfo


def open_positions(
    path: Path, shape: tuple[int, int], images_file: Path, limit: int | None = None
) -> NpyImages:
    """Open ``<split>_positions.npy`` [N, K, W >= 2] matching the features' ``shape = (N, K)``
    (as stored on disk, before any ``limit``)."""
    pinfo = read_npy_header(path, ndim=3)
    if pinfo.shape[:2] != tuple(shape) or pinfo.shape[2] < 2:
        raise DataError(
            path,
            f"positions have shape {pinfo.shape}; expected [{shape[0]}, {shape[1]}, 2T or 2T + 1] "
            f"(T block indices, T weights, optional area) to match {images_file.name}",
        )
    return NpyImages(path, limit=limit, info=pinfo)
