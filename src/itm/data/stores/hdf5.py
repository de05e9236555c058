"""The project's HDF5 feature store (h5py): one ``<split>.h5`` file per split.

Layout of a file (``itm_format = "itm-h5"``, ``itm_version = 1`` attributes):

- ``images``: float32 or float16 [N, K, D], chunked one image per chunk (a training read touches
  exactly one chunk), uncompressed;
- ``captions``: UTF-8 strings [N_cap];
- ``cap_to_img``: int64 [N_cap], the image of each caption: the explicit caption <-> image index,
  so any number of captions per image works (every image needs at least one);
- optional ``ids`` (strings [N]) and ``boxes`` (float32 [N, K, 4]);
- attributes ``split``, ``source``, ``finite_checked`` (the writer verified that every feature
  is finite, so readers skip that scan).

Files are written through :func:`itm.io.atomic_path` (a temporary name in the destination
directory, renamed only when complete: an error or a crash never leaves a half-written
``<split>.h5``, and an existing file stays as it was). Readers open the file lazily in
each process (never before a fork; h5py handles are not picklable nor fork-safe).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from itm.data.stores.base import FeatureSplit, image_index
from itm.data.stores.npy import open_npy_split
from itm.data.validation import DataError, check_cap_to_img, check_finite_rows
from itm.io import atomic_path

__all__ = ["H5_FORMAT", "H5_VERSION", "H5Images", "convert_split", "open_h5_split", "write_h5"]

H5_FORMAT = "itm-h5"
H5_VERSION = 1
_INHERITED: list[Any] = []  # h5py handles a forked child inherited (kept, never touched)


def _h5py() -> Any:
    import h5py

    return h5py


class H5Images:
    """Array-like view of the first ``limit`` rows of a dataset of an HDF5 file.

    ``shape``, ``dtype``, ``len()``, ``x[i]`` / ``x[i:j]`` (numpy arrays read from the file). The file
    is opened read-only on first access in each process (after a fork the child opens its own);
    pickling drops the handle, so the object travels to DataLoader workers and spawned processes.

    Args:
        path: the ``.h5`` file.
        name: the dataset inside it.
        shape: the full dataset shape (read from the file when omitted).
        dtype: its dtype (read from the file when omitted).
        limit: expose only the first ``limit`` rows.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        name: str = "images",
        shape: tuple[int, ...] | None = None,
        dtype: Any = None,
        limit: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = name
        if shape is None or dtype is None:
            with _h5py().File(self.path, "r") as f:
                shape, dtype = tuple(f[name].shape), f[name].dtype
        self._full_shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        n = self._full_shape[0]
        self.n = n if limit is None else max(0, min(int(limit), n))
        self._file: Any = None
        self._ds: Any = None
        self._pid = -1

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self._full_shape[1:])

    @property
    def ndim(self) -> int:
        return len(self._full_shape)

    def __len__(self) -> int:
        return self.n

    def _dataset(self) -> Any:
        if self._ds is None or self._pid != os.getpid():
            if self._file is not None:
                # A handle inherited through fork is never used nor closed by the child: keep a
                # reference so that it is not finalised here either.
                _INHERITED.append(self._file)
            self._file = _h5py().File(self.path, "r")
            self._ds = self._file[self.name]
            self._pid = os.getpid()
        return self._ds

    def __getitem__(self, idx: Any) -> np.ndarray:
        ds = self._dataset()
        if isinstance(idx, (int, np.integer)):
            return ds[image_index(idx, self.n)]
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self.n)
            return ds[start:stop:step]
        raise TypeError(f"H5Images supports int and slice indices, got {type(idx).__name__}")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.array(self[:], dtype=dtype)

    def close(self) -> None:
        """Close this process's handle (reopened on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._ds = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _ds=None, _pid=-1)
        return state

    def __repr__(self) -> str:
        return (
            f"H5Images({str(self.path)!r}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"
        )


# ---- writing ----------------------------------------------------------------------------------


def write_h5(
    path: str | os.PathLike[str],
    images: Any,
    captions: Sequence[str],
    cap_to_img: Any,
    *,
    ids: Sequence[str] | None = None,
    boxes: Any = None,
    float16: bool = False,
    split: str = "",
    source: str = "",
    source_file: str | os.PathLike[str] | None = None,
    chunk_images: int = 256,
) -> Path:
    """Write one split as an ``itm-h5`` file, atomically.

    Features are copied ``chunk_images`` images at a time (bounded memory for any size) and
    checked to be finite (after the float16 cast, which must not overflow).

    Args:
        path: destination ``.h5`` file (its directory must exist).
        images: array-like float [N, K, D] supporting ``images[i:j]``.
        captions: N_cap non-empty strings.
        cap_to_img: int [N_cap] image index of each caption (every image at least once).
        ids: optional per-image ids [N].
        boxes: optional array-like [N, K, 4].
        float16: store features as float16 (half the size; ~3 significant digits).
        split, source: recorded as attributes.
        source_file: the file named in error messages about features (default ``path``).
        chunk_images: images per copy step.

    Returns:
        ``path``.

    Raises:
        DataError: naming the file: NaN/inf features, float16 overflow, empty captions, bad
            ``cap_to_img``, ids / boxes not matching the images.
    """
    h5py = _h5py()
    path = Path(path)
    src = Path(source_file) if source_file is not None else path
    shape = tuple(int(s) for s in images.shape)
    if len(shape) != 3:
        raise DataError(
            src, f"feature array has shape {shape}; expected rank 3: [images, regions, dim]"
        )
    n, k, d = shape
    cap_to_img = check_cap_to_img(np.asarray(cap_to_img), n, src)
    if len(cap_to_img) != len(captions):
        raise DataError(
            src, f"{len(captions)} captions but cap_to_img has {len(cap_to_img)} entries"
        )
    empty = [i for i, c in enumerate(captions) if not str(c).strip()]
    if empty:
        raise DataError(src, f"empty caption (caption {empty[0]})")
    if ids is not None and len(ids) != n:
        raise DataError(src, f"{len(ids)} ids for {n} images")
    if boxes is not None and (tuple(boxes.shape[:2]) != (n, k) or boxes.shape[2] < 4):
        raise DataError(src, f"boxes have shape {tuple(boxes.shape)}; expected [{n}, {k}, 4]")
    dtype = np.float16 if float16 else np.float32
    f16_max = float(np.finfo(np.float16).max)

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(
            {
                "itm_format": H5_FORMAT,
                "itm_version": H5_VERSION,
                "split": split,
                "source": source,
                "float16": bool(float16),
                "finite_checked": False,
            }
        )
        ds = f.create_dataset("images", shape=(n, k, d), dtype=dtype, chunks=(1, k, d))
        release = getattr(images, "release", None)
        for start in range(0, n, chunk_images):
            stop = min(n, start + chunk_images)
            block = np.asarray(images[start:stop])
            check_finite_rows(block, src)  # the source's own NaN / inf
            if float16 and np.abs(block).max() > f16_max:
                i = int(np.argmax(np.abs(block.reshape(len(block), -1)).max(1) > f16_max))
                raise DataError(
                    src,
                    f"image {start + i} has values beyond the float16 range (+-{f16_max:g}); "
                    f"convert without --float16",
                )
            ds[start:stop] = block.astype(dtype, copy=False)
            del block
            if release is not None:
                release()
        f.create_dataset(
            "captions",
            data=np.array([str(c) for c in captions], dtype=object),
            dtype=h5py.string_dtype("utf-8"),
        )
        f.create_dataset("cap_to_img", data=cap_to_img, dtype=np.int64)
        if ids is not None:
            f.create_dataset(
                "ids",
                data=np.array([str(i) for i in ids], dtype=object),
                dtype=h5py.string_dtype("utf-8"),
            )
        if boxes is not None:
            bds = f.create_dataset(
                "boxes",
                shape=tuple(boxes.shape),
                dtype=np.float32,
                chunks=(1, *boxes.shape[1:]),
            )
            for start in range(0, n, 4096):
                bds[start : start + 4096] = np.asarray(boxes[start : start + 4096], np.float32)
        f.attrs["finite_checked"] = True
    return path


def convert_split(
    root: str | os.PathLike[str],
    split: str,
    out: str | os.PathLike[str],
    float16: bool = False,
) -> Path:
    """Convert one split of a precomp directory into ``out`` (an ``itm-h5`` file).

    The source is validated first (:func:`~itm.data.stores.npy.open_npy_split`, without the
    separate finite scan: the copy checks every chunk).
    """
    store = open_npy_split(root, split, limit=None, check_finite=False)
    return write_h5(
        out,
        store.images,
        store.captions,
        store.cap_to_img,
        ids=store.ids,
        boxes=store.boxes,
        float16=float16,
        split=split,
        source=str(Path(root).resolve()),
        source_file=store.images_file,
    )


# ---- reading ----------------------------------------------------------------------------------


def open_h5_split(
    path: str | os.PathLike[str],
    limit: int | None = None,
    check_finite: bool = True,
    split: str | None = None,
) -> FeatureSplit:
    """Open and validate an ``itm-h5`` split file (features stay on disk; the file is closed
    again before returning).

    Args:
        path: the ``.h5`` file.
        limit: keep only the first ``limit`` images and the captions of those images.
        check_finite: scan the kept features for NaN / inf unless the writer already did.
        split: the split name (default: the file's ``split`` attribute or its stem).

    Raises:
        DataError: naming the file: missing, not HDF5 or corrupt (truncated, unreadable data),
            not an itm store, inconsistent datasets, empty captions, NaN/inf features.
    """
    h5py = _h5py()
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found (create it with `itm-prepare h5 DIR`)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(path, f"corrupt or not an HDF5 file ({e})") from None
    try:
        with f:
            if f.attrs.get("itm_format") != H5_FORMAT:
                raise DataError(
                    path,
                    "not an itm HDF5 store (no itm_format attribute); create it with "
                    "`itm-prepare h5 DIR`",
                )
            for name in ("images", "captions", "cap_to_img"):
                if name not in f:
                    raise DataError(path, f"corrupt itm HDF5 store: dataset {name!r} is missing")
            ds = f["images"]
            if ds.ndim != 3:
                raise DataError(
                    path,
                    f"feature array has shape {ds.shape} (rank {ds.ndim}); expected rank 3: "
                    f"[images, regions, dim]",
                )
            if ds.dtype.kind != "f":
                raise DataError(path, f"feature array has dtype {ds.dtype}; expected float")
            n_all = int(ds.shape[0])
            if n_all == 0 or 0 in ds.shape:
                raise DataError(path, f"feature array is empty (shape {ds.shape})")
            shape, dtype = tuple(ds.shape), ds.dtype
            ds[0], ds[n_all - 1]  # noqa: B018 - the first and last chunks are readable
            captions = [str(c) for c in f["captions"].asstr()[()]]
            cap_to_img = check_cap_to_img(f["cap_to_img"][()], n_all, path)
            if len(cap_to_img) != len(captions):
                raise DataError(
                    path,
                    f"{len(captions)} captions but cap_to_img has {len(cap_to_img)} entries",
                )
            empty = [i for i, c in enumerate(captions) if not c.strip()]
            if empty:
                raise DataError(path, f"empty caption (caption {empty[0]})")
            ids = [str(i) for i in f["ids"].asstr()[()]] if "ids" in f else None
            has_boxes = "boxes" in f
            finite_checked = bool(f.attrs.get("finite_checked", False))
            name = split or str(f.attrs.get("split") or path.stem)
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise DataError(path, f"corrupt HDF5 store: cannot be read ({e})") from None

    images = H5Images(path, "images", shape, dtype, limit)
    n = len(images)
    if n < n_all:
        keep = cap_to_img < n
        captions = [c for c, k in zip(captions, keep, strict=True) if k]
        cap_to_img = cap_to_img[keep]
        ids = ids[:n] if ids is not None else None
    boxes = H5Images(path, "boxes", limit=limit) if has_boxes else None
    if check_finite and not finite_checked:
        try:
            check_finite_rows(images, path, n)
        except OSError as e:
            raise DataError(path, f"corrupt HDF5 store: features cannot be read ({e})") from None
        finally:
            images.close()
    return FeatureSplit(
        name=name,
        images=images,
        captions=captions,
        cap_to_img=cap_to_img,
        images_file=path,
        captions_file=path,
        ids=ids,
        boxes=boxes,
        format="h5",
        meta={"n_images_on_disk": n_all},
    )
