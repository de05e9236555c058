"""Small helpers for the entry points: loggers, result tables, config access."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

RECALL_KEYS = ("r1", "r5", "r10", "medr", "meanr")


def wandb_has_credentials() -> bool:
    """True when W&B can log online: a mode or key in the environment, or a netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def instantiate_loggers(cfg: DictConfig | None) -> list:
    """Build every logger of the ``logger`` group (a dict of nodes; empty/null = no logging).

    A W&B logger with no credentials and no ``WANDB_MODE`` falls back to offline mode (so the
    default works with no account) and says how to sync.
    """
    if not cfg:
        return []
    loggers = []
    for name, node in cfg.items():
        if node is None or "_target_" not in node:
            continue
        if (
            "WandbLogger" in node._target_
            and not node.get("offline")
            and not wandb_has_credentials()
        ):
            node = OmegaConf.merge(node, {"offline": True})
            print(
                f"[itm] logger {name}: no W&B credentials or WANDB_MODE; logging offline "
                "(sync later with `wandb sync <run dir>`)"
            )
        loggers.append(instantiate(node))
    return loggers


def format_metrics_table(metrics: Mapping[str, float], title: str = "test") -> str:
    """A readable plain-text recall table; the last line is ``rsum``."""
    header = f"{title:<8}" + "".join(f"{k:>9}" for k in ("R@1", "R@5", "R@10", "medr", "meanr"))
    lines = [header, "-" * len(header)]
    for direction, label in (("i2t", "i2t"), ("t2i", "t2i")):
        vals = [metrics.get(f"{direction}_{k}", float("nan")) for k in RECALL_KEYS]
        lines.append(f"{label:<8}" + "".join(f"{v:>9.2f}" for v in vals))
    lines.append(f"{'rsum':<8}{metrics.get('rsum', float('nan')):>9.2f}")
    return "\n".join(lines)
