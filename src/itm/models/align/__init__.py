"""Alignment heads, one file per paper."""

from itm.models.align.base import AlignHead
from itm.models.align.scan import SCAN

__all__ = ["SCAN", "AlignHead"]
