"""Small helpers for the entry points: result tables (loggers: :mod:`itm.loggers`)."""

from __future__ import annotations

from collections.abc import Mapping

RECALL_KEYS = ("r1", "r5", "r10", "medr", "meanr")


def format_metrics_table(metrics: Mapping[str, float], title: str = "test") -> str:
    """A readable plain-text recall table; the last line is ``rsum``."""
    header = f"{title:<8}" + "".join(f"{k:>9}" for k in ("R@1", "R@5", "R@10", "medr", "meanr"))
    lines = [header, "-" * len(header)]
    for direction, label in (("i2t", "i2t"), ("t2i", "t2i")):
        vals = [metrics.get(f"{direction}_{k}", float("nan")) for k in RECALL_KEYS]
        lines.append(f"{label:<8}" + "".join(f"{v:>9.2f}" for v in vals))
    lines.append(f"{'rsum':<8}{metrics.get('rsum', float('nan')):>9.2f}")
    return "\n".join(lines)
