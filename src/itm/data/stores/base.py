"""What every feature store is: the :class:`FeatureStore` protocol the datasets read, the
:class:`FeatureSplit` record the npy and HDF5 stores open a split into, and :func:`image_index`.

A feature store holds one split:

- ``images``: array-like float [N, K, D] indexable per image (``images[i]`` -> [K, D]; a numpy
  array, a memory map, an HDF5 dataset ...);
- ``captions``: list[str] of length N_cap;
- ``cap_to_img``: int64 [N_cap], the image index of each caption.

This module imports numpy only (no torch, no Lightning, no h5py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["FeatureSplit", "FeatureStore", "image_index"]


@runtime_checkable
class FeatureStore(Protocol):
    """What the datasets need from a split (see the module docstring)."""

    images: Any  # array-like [N, K, D], images[i] -> [K, D]
    captions: list[str]  # [N_cap]
    cap_to_img: np.ndarray  # int64 [N_cap]


def image_index(idx: int | np.integer, n: int) -> int:
    """``idx`` as a non-negative row of ``n`` images (negative counts from the end);
    ``IndexError`` naming both when out of range."""
    i = int(idx)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"image index {idx} out of range for {n} images")
    return i


@dataclass
class FeatureSplit:
    """One loaded, validated split (a :class:`FeatureStore`).

    Attributes:
        name: split name.
        images: array-like [N, K, D] (:class:`~itm.data.stores.npy.NpyImages` or
            :class:`~itm.data.stores.hdf5.H5Images`).
        captions: N_cap caption strings.
        cap_to_img: int64 [N_cap] image index of each caption.
        images_file: the file holding the features (for messages).
        captions_file: the file holding the captions (for messages).
        ids: per-image ids (``<split>_ids.txt``) or ``None``.
        boxes: array-like [N, K, 4] region boxes or ``None``.
        format: ``"npy"`` or ``"h5"``.
        positions: array-like [N, K, W] PFAN position rows (``W`` = 30 or 31 for the
            authors' release) or ``None``; served to an image encoder that asks for them.
        positions_file: the file holding the positions (for messages).
    """

    name: str
    images: Any
    captions: list[str]
    cap_to_img: np.ndarray
    images_file: Path
    captions_file: Path
    ids: list[str] | None = None
    boxes: Any = None
    format: str = "npy"
    meta: dict[str, Any] = field(default_factory=dict)
    positions: Any = None
    positions_file: Path | None = None

    @property
    def n_regions(self) -> int:
        return int(self.images.shape[1])

    @property
    def img_dim(self) -> int:
        return int(self.images.shape[2])

    def summary(self) -> dict[str, Any]:
        counts = np.bincount(self.cap_to_img, minlength=len(self.images))
        cpi = (
            str(int(counts[0]))
            if (counts == counts[0]).all()
            else f"{int(counts.min())}-{int(counts.max())}"
        )
        return {
            "split": self.name,
            "format": self.format,
            "images": len(self.images),
            "captions": len(self.captions),
            "caps/img": cpi,
            "regions": self.n_regions,
            "dim": self.img_dim,
            "dtype": str(self.images.dtype),
            "file": str(self.images_file),
        }
