"""Alignment heads, one file per paper (``scan``, ``bfan``, ``chan``, ``imram``, ``vse_infinity``),
the head interface (``base``), the shared attention step (``attention``) and the block-wise
scoring engine (``engine``, with the fused CPU kernel in ``fused``)."""

from itm.models.align.base import AlignHead, Block
from itm.models.align.scan import SCAN

__all__ = ["SCAN", "AlignHead", "Block"]
