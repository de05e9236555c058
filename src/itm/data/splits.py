"""The split names of the data layer (plain constants: importing them loads neither torch nor
Lightning, so ``itm-prepare`` starts fast)."""

from __future__ import annotations

__all__ = ["SPLITS"]

#: every split a data directory may hold (``testall``: the COCO 5K test images)
SPLITS: tuple[str, ...] = ("train", "dev", "test", "testall")
