"""Weights & Biases logger with itm's defaults (``logger=wandb``).

On top of Lightning's ``WandbLogger``:

- ``offline: true`` logs to a local run directory (``<output_dir>/wandb/offline-run-*``) and
  still allows checkpoint artifacts (``log_model``), which are uploaded by ``wandb sync``;
- inside a Hydra multirun, ``group`` defaults to ``<task>-<sweep dir name>`` and ``name`` to
  ``<job num>-<overrides>``, so a sweep shows up as one group with one run per job;
- ``define_metric``: every figure is plotted against ``trainer/global_step``; the run summary
  keeps the MAX of ``dev/rsum`` and of every ``dev`` recall (MIN of the ranks), and
  :meth:`WandbLogger.finish` writes ``dev/best_rsum`` and the test figures into it;
- :meth:`WandbLogger.finish` ends the run (``wandb.finish``; itm's ``train`` calls it in a
  ``finally`` so that every multirun job gets its own run, also when a job fails) and prints how
  to upload an offline run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

__all__ = ["WandbLogger", "hydra_sweep_group_and_name"]

STEP_METRIC = "trainer/global_step"
RECALL_MAX = ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
RECALL_MIN = ("i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")


def hydra_sweep_group_and_name() -> tuple[str | None, str | None]:
    """(group, name) of the current Hydra multirun job, or (None, None) outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return None, None
    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    group = f"{hc.job.name}-{Path(str(hc.sweep.dir)).name}"
    overrides = str(hc.job.override_dirname or "")
    num = hc.job.get("num", 0)
    name = f"{num}-{overrides}" if overrides else f"job{num}"
    return group, re.sub(r"\s+", "", name)[:120]


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger with itm's defaults (see the module docstring).

    Args:
        project: W&B project.
        entity: W&B entity (user or team); ``None`` = the account's default.
        group: run group; ``None`` = the sweep inside a Hydra multirun, else no group.
        tags: run tags.
        name: run name; ``None`` = the job's overrides inside a multirun, else W&B's choice.
        save_dir: where ``wandb/`` is written (the run's output directory).
        offline: log to disk only (upload later with ``wandb sync``).
        log_model: ``False`` | ``True`` (best/last checkpoints at the end) | ``"all"`` (every
            checkpoint): logged as W&B artifacts.
        job_type, notes: passed to ``wandb.init``.
        **kwargs: any other ``wandb.init`` argument.
    """

    def __init__(
        self,
        project: str = "itm",
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] | None = None,
        name: str | None = None,
        save_dir: str = ".",
        offline: bool = False,
        log_model: bool | str = False,
        job_type: str | None = "train",
        notes: str | None = None,
        **kwargs: Any,
    ) -> None:
        sweep_group, sweep_name = hydra_sweep_group_and_name()
        group = group or sweep_group
        name = name or sweep_name
        if offline:
            kwargs["mode"] = "offline"
        for key, value in (
            ("entity", entity),
            ("group", group),
            ("job_type", job_type),
            ("notes", notes),
        ):
            if value is not None:
                kwargs[key] = value
        if tags:
            kwargs["tags"] = [str(t) for t in tags]
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        # Lightning's own `offline=True` forbids artifacts; wandb's mode="offline" keeps them.
        super().__init__(
            name=name, save_dir=str(save_dir), project=project, log_model=log_model, **kwargs
        )
        self.is_offline = bool(offline)
        self._itm_metrics_defined = False
        self.sync_hint: str | None = None

    @property
    def experiment(self) -> Any:
        exp = super().experiment
        if not self._itm_metrics_defined and self._experiment is not None:
            self._itm_metrics_defined = True
            define = getattr(exp, "define_metric", None)
            if callable(define):
                # the summary keeps the best dev figure (and the last one); test: the last
                for k in RECALL_MAX:
                    define(f"dev/{k}", step_metric=STEP_METRIC, summary="max,last")
                for k in RECALL_MIN:
                    define(f"dev/{k}", step_metric=STEP_METRIC, summary="min,last")
        return exp

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Write ``values`` into the run summary (rank 0 only; no-op without a run)."""
        if self._experiment is None or not values:
            return
        summary = getattr(self._experiment, "summary", None)
        if summary is not None:
            summary.update(dict(values))

    def finish(self, exit_code: int | None = None) -> None:
        """End the run (``wandb.finish``); print how to upload it when it was logged offline."""
        exp = self._experiment
        if exp is None or not hasattr(exp, "finish"):
            return
        offline = bool(getattr(exp, "offline", False))
        run_dir = getattr(exp, "dir", None)
        exp.finish(exit_code=exit_code)
        self._experiment = None
        if offline and run_dir:
            path = Path(run_dir).parent  # .../wandb/offline-run-<time>-<id>
            self.sync_hint = f"wandb sync {path}"
            print(f"[itm] W&B run logged offline in {path}\n[itm] upload it with: {self.sync_hint}")
