"""Checks of input data files, each failing with a :class:`DataError` that names the file and
the problem.

Everything here is cheap on huge files: ``.npy`` files are checked from their header and size
(nothing is loaded), finite-value scans read bounded chunks, captions are read as text once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataError",
    "DataWarning",
    "NpyInfo",
    "check_cap_to_img",
    "check_finite_rows",
    "read_npy_header",
    "read_text_lines",
]


class DataError(ValueError):
    """Bad input data. ``str(err)`` is ``"<file>: <problem>"``.

    Attributes:
        path: the offending file (or directory).
        problem: what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader workers / spawn
        return (type(self), (self.path, self.problem))


class DataWarning(UserWarning):
    """Suspicious but usable input data (e.g. captions made only of unknown words)."""


@dataclass(frozen=True)
class NpyInfo:
    """What the header of a ``.npy`` file says.

    Attributes:
        path: the file.
        shape: array shape.
        dtype: element type.
        fortran_order: column-major layout.
        offset: byte offset of the data.
    """

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int

    @property
    def data_bytes(self) -> int:
        return int(math.prod(self.shape)) * self.dtype.itemsize


def read_npy_header(path: str | os.PathLike[str], ndim: int | None = None) -> NpyInfo:
    """Read and check the header of a ``.npy`` file without loading its data.

    Checks: the file exists and is a ``.npy`` file, holds a floating-point array (float16/32/64),
    of rank ``ndim`` when given, with no zero-sized axis, and is not truncated (the file holds as
    many bytes as the header promises).

    Args:
        path: the file.
        ndim: required rank, or ``None``.

    Raises:
        DataError: naming ``path`` and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    size = path.stat().st_size
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:  # (3, 0): utf-8 header, same content; numpy reads it through its memmap
                arr = np.load(path, mmap_mode="r")
                shape, dtype = arr.shape, arr.dtype
                fortran = arr.flags.f_contiguous and not arr.flags.c_contiguous
                f.seek(arr.offset)
                del arr
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise DataError(path, f"not a readable .npy file ({e})") from None
    info = NpyInfo(path, tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran), offset)
    if info.dtype.kind != "f":
        raise DataError(
            path, f"feature array has dtype {info.dtype}; expected float16, float32 or float64"
        )
    if ndim is not None and len(info.shape) != ndim:
        what = "[images, regions, dim]" if ndim == 3 else f"rank {ndim}"
        raise DataError(
            path,
            f"feature array has shape {info.shape} (rank {len(info.shape)}); "
            f"expected rank {ndim}: {what}",
        )
    if any(s == 0 for s in info.shape):
        raise DataError(path, f"feature array is empty (shape {info.shape})")
    have = size - offset
    if have < info.data_bytes:
        raise DataError(
            path,
            f"truncated .npy file: the header promises shape {info.shape} {info.dtype} "
            f"({info.data_bytes:,} bytes of data) but the file holds {max(have, 0):,} "
            f"(re-copy or re-create it)",
        )
    return info


def read_text_lines(path: str | os.PathLike[str], what: str = "caption") -> list[str]:
    """Read a UTF-8 text file with one item per line (captions, ids).

    Lines are stripped of surrounding whitespace (``\\r\\n`` endings work); a UTF-8 byte-order
    mark and blank lines at the very end of the file are ignored. Any other empty line is an
    error.

    Args:
        path: the file.
        what: what a line holds, for messages ("caption", "image id").

    Raises:
        DataError: naming ``path``: missing file, bytes that are not UTF-8 (with the line
            number), or an empty line (with its number).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            path,
            f"not valid UTF-8: byte 0x{data[e.start]:02x} on line {line} cannot be decoded "
            f"({e.reason}); re-encode the file as UTF-8",
        ) from None
    lines = [line.strip() for line in text.removeprefix("\ufeff").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    empty = [i for i, line in enumerate(lines) if not line]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(path, f"empty {what} on line {empty[0] + 1}{more}")
    return lines


def check_finite_rows(
    images: Any,
    path: str | os.PathLike[str],
    n_rows: int | None = None,
    chunk_bytes: int = 64 << 20,
) -> None:
    """Check that every value of ``images[:n_rows]`` is finite, reading bounded chunks.

    The float64 sum of a chunk of float16/32 values is finite exactly when every value is
    (it cannot overflow), so the common case costs one pass without temporaries; the offending
    image is located only when a chunk fails.

    Args:
        images: array-like [N, ...] supporting ``images[i:j]`` (numpy array, memory map,
            :class:`~itm.data.precomp.NpyImages`, h5py dataset ...).
        path: the file, for the message.
        n_rows: check the first ``n_rows`` rows (default all).
        chunk_bytes: bytes read per chunk.

    Raises:
        DataError: naming ``path``, the first bad image and how many NaN / inf values it has.
    """
    n = len(images) if n_rows is None else int(n_rows)
    row_bytes = int(math.prod(images.shape[1:])) * np.dtype(images.dtype).itemsize
    step = max(1, chunk_bytes // max(row_bytes, 1))
    release = getattr(images, "release", None)
    for start in range(0, n, step):
        stop = min(n, start + step)
        chunk = np.asarray(images[start:stop])
        total = np.sum(chunk, dtype=np.float64)
        if not np.isfinite(total) and not np.isfinite(chunk).all():
            flat = chunk.reshape(len(chunk), -1)
            bad = ~np.isfinite(flat).all(axis=1)
            first = int(np.argmax(bad))
            row = flat[first]
            n_nan, n_inf = int(np.isnan(row).sum()), int(np.isinf(row).sum())
            n_bad_imgs = int(bad.sum())
            raise DataError(
                path,
                f"non-finite features: image {start + first} has {n_nan} NaN and {n_inf} inf "
                f"values ({n_bad_imgs} bad image(s) in rows {start}..{stop - 1}); "
                f"fix or drop those images",
            )
        del chunk
        if release is not None:
            release()


def check_cap_to_img(
    cap_to_img: np.ndarray, n_images: int, path: str | os.PathLike[str]
) -> np.ndarray:
    """Check an explicit caption -> image index: int [N_cap], values in ``[0, n_images)``, every
    image with at least one caption. Returns it as int64.

    Raises:
        DataError: naming ``path`` and the problem.
    """
    arr = np.asarray(cap_to_img)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise DataError(
            path, f"cap_to_img must be a 1-D integer array, got {arr.dtype} {arr.shape}"
        )
    arr = arr.astype(np.int64)
    if len(arr) == 0:
        raise DataError(path, "no captions")
    if arr.min() < 0 or arr.max() >= n_images:
        raise DataError(
            path,
            f"cap_to_img holds image indices {arr.min()}..{arr.max()} outside [0, {n_images})",
        )
    counts = np.bincount(arr, minlength=n_images)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise DataError(
            path, f"{len(missing)} image(s) have no caption (first: image {int(missing[0])})"
        )
    return arr


def captions_per_image(
    n_captions: int, n_images: int, captions_path: Path, images_path: Path
) -> int:
    """Captions per image of the precomp layout (consecutive groups), checked.

    Raises:
        DataError: naming the caption file when the count is not a positive multiple.
    """
    if n_captions == 0:
        raise DataError(captions_path, "no captions")
    if n_captions % n_images != 0 or n_captions < n_images:
        raise DataError(
            captions_path,
            f"{n_captions} captions for {n_images} images in {images_path.name}: the caption "
            f"count must be a multiple of the image count (consecutive captions per image, "
            f"5 in Flickr30K / COCO)",
        )
    return n_captions // n_images


def first_lines(items: Sequence[int], k: int = 3) -> str:
    """``"line 3, line 17, line 20"`` for 0-based indices (for messages)."""
    return ", ".join(f"line {i + 1}" for i in items[:k])
