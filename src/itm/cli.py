"""Console scripts ``itm-train`` / ``itm-eval``: the same Hydra apps as the root scripts."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig


def config_dir() -> str:
    """The Hydra config directory: ``$ITM_CONFIG_DIR`` or the repository's ``conf/``."""
    env = os.environ.get("ITM_CONFIG_DIR")
    if env:
        return str(Path(env).resolve())
    return str(Path(__file__).resolve().parents[2] / "conf")


def objective(metrics: dict[str, float], cfg: DictConfig) -> float | None:
    """The value a Hydra sweeper optimises (``cfg.optimized_metric``, default dev/best_rsum)."""
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


def train_main() -> None:
    from itm.train import train

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
    def _main(cfg: DictConfig) -> float | None:
        return objective(train(cfg), cfg)

    _main()


def eval_main() -> None:  # pragma: no cover - issue 5
    raise SystemExit("itm-eval: evaluation of saved checkpoints is not available yet")
