"""Console scripts ``itm-train`` / ``itm-eval``: the same Hydra apps as the root scripts."""

from __future__ import annotations

import os
import sys
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


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept ``+experiment=NAME`` as well as ``experiment=NAME``.

    ``conf/train.yaml`` lists ``experiment: null`` in its defaults (so ``experiment=NAME`` works,
    as in the lightning-hydra-template); Hydra itself would reject the ``+`` spelling with
    "Multiple values for experiment". Both select the same recipe.
    """
    return [a[1:] if a.startswith("+experiment=") else a for a in argv]


def train_main() -> None:
    from itm.train import train

    sys.argv = normalize_argv(sys.argv)

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
    def _main(cfg: DictConfig) -> float | None:
        return objective(train(cfg), cfg)

    _main()


def eval_main() -> None:
    """``itm-eval ckpt_path=... [data=...] protocol=f30k``: the same Hydra app as ``eval.py``."""
    from hydra.core.hydra_config import HydraConfig

    from itm.evaluate import evaluate, with_output_dir

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
    def _main(cfg: DictConfig) -> float | None:
        metrics = evaluate(with_output_dir(cfg, HydraConfig.get().runtime.output_dir))
        return next((v for k, v in metrics.items() if k.endswith("/rsum")), None)

    _main()
