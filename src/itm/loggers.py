"""Loggers with itm's defaults (``logger=wandb`` / ``logger=tensorboard``) and their construction.

:class:`WandbLogger`, on top of Lightning's ``WandbLogger``:

- authentication is wandb's own business: an API key, ``wandb login``, a self-hosted server
  (``WANDB_BASE_URL``), identity tokens or ``WANDB_MODE`` all work as wandb documents them;
  ``offline: true`` logs to a local run directory (``<output_dir>/wandb/offline-run-*``, upload
  with ``wandb sync``). When wandb cannot start a run, the error says how to fix it in one line;
- inside a Hydra multirun, ``group`` defaults to ``<task>-<sweep dir name>`` and ``name`` to
  ``<job num>-<overrides>``, so a sweep shows up as one group with one run per job;
- ``define_metric``: every figure is plotted against ``trainer/global_step``; the run summary
  keeps the MAX of ``dev/rsum`` and of every ``dev`` recall (MIN of the ranks), and
  :meth:`WandbLogger.log_summary` writes ``dev/best_rsum`` and the test figures into it;
- ``log_model``: ``best.ckpt`` (alias ``best``) and ``last.ckpt`` (alias ``last``) as model
  artifacts, at the end (``true``) or at every save (``"all"``);
- the run id is stored in every checkpoint (:func:`wandb_run_state`, ``ITMModule``), and
  ``itm.train`` resumes a checkpoint's W&B run (``id=``), so a resumed training continues the
  same W&B run;
- :meth:`WandbLogger.finish` ends the run (``wandb.finish``; itm's ``train`` calls it in a
  ``finally`` so that every multirun job gets its own run, also when a job fails) and logs how
  to upload an offline run.

:class:`TensorBoardLogger`: Lightning's, failing with an "install itm[tensorboard]" message when
TensorBoard is not installed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import DummyExperiment
from omegaconf import DictConfig

from itm.errors import MissingExtraError, UserError, extra_available

log = logging.getLogger(__name__)

__all__ = [
    "WANDB_RUN_KEY",
    "TensorBoardLogger",
    "WandbLogger",
    "WandbSetupError",
    "hydra_sweep_group_and_name",
    "instantiate_loggers",
    "wandb_run_state",
]

STEP_METRIC = "trainer/global_step"
RECALL_MAX = ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
RECALL_MIN = ("i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")
#: key of the W&B run (``{"id", "project"}``) in a checkpoint dict
WANDB_RUN_KEY = "itm_wandb_run"


class WandbSetupError(UserError):
    """wandb could not start a run (no credentials, unreachable server, bad settings)."""


def hydra_sweep_group_and_name() -> tuple[str | None, str | None]:
    """(group, name) of the current Hydra multirun job, or (None, None) outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    group = f"{hc.job.name}-{Path(str(hc.sweep.dir)).name}"
    overrides = str(hc.job.override_dirname or "")
    num = hc.job.num
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
        log_model: ``False`` | ``True`` (best / last checkpoints at the end) | ``"all"`` (every
            saved checkpoint): logged as W&B model artifacts.
        job_type, notes: passed to ``wandb.init``.
        **kwargs: any other ``wandb.init`` argument (``id=`` continues that run).
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
        # Checkpoint artifacts are logged here (`log_model`), not by Lightning.
        super().__init__(name=name, save_dir=str(save_dir), project=project, **kwargs)
        if log_model not in (False, True, "all"):
            raise ValueError(
                f"logger.wandb.log_model must be false, true or all, got {log_model!r}"
            )
        self.is_offline = bool(offline)
        self.log_model_mode: bool | str = log_model
        self.sync_hint: str | None = None
        self._run: Any = None  # the wandb run this logger started (rank 0), until finished
        self._checkpoint_sources: dict[int, ModelCheckpoint] = {}
        self._logged_files: dict[str, float] = {}

    @property
    def experiment(self) -> Any:
        """The wandb run (started on first use; Lightning's no-op object on other ranks)."""
        if self._run is not None:
            return self._run
        try:
            exp = super().experiment
        except Exception as err:
            import wandb

            if not isinstance(err, wandb.errors.Error):
                raise
            raise WandbSetupError(
                f"W&B could not start a run ({str(err).strip().splitlines()[0]}): log in "
                "(`wandb login`, WANDB_API_KEY; WANDB_BASE_URL for your own server) or log "
                "offline (logger.wandb.offline=true or WANDB_MODE=offline)"
            ) from err
        if isinstance(exp, DummyExperiment):
            return exp
        self._run = exp
        define = getattr(exp, "define_metric", None)
        if callable(define):
            # the summary keeps the best dev figure (and the last one); test: the last
            for k in RECALL_MAX:
                define(f"dev/{k}", step_metric=STEP_METRIC, summary="max,last")
            for k in RECALL_MIN:
                define(f"dev/{k}", step_metric=STEP_METRIC, summary="min,last")
        return exp

    @property
    def run_id(self) -> str | None:
        """The id of the run this logger started (None before the first use)."""
        return None if self._run is None else str(self._run.id)

    def log_summary(self, values: Mapping[str, Any]) -> None:
        """Write ``values`` into the run summary (rank 0 only; no-op without a run)."""
        if self._run is None or not values:
            return
        summary = getattr(self._run, "summary", None)
        if summary is not None:
            summary.update(dict(values))

    # --- checkpoint artifacts ------------------------------------------------------------------

    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        if self.log_model_mode == "all":
            self.log_checkpoints(checkpoint_callback)
        elif self.log_model_mode is True:
            self._checkpoint_sources[id(checkpoint_callback)] = checkpoint_callback

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if status == "success" and self._run is not None:
            for callback in self._checkpoint_sources.values():
                self.log_checkpoints(callback)

    def log_checkpoints(self, callback: ModelCheckpoint) -> None:
        """Log the files of a ``ModelCheckpoint`` not logged yet (or changed since) as versions
        of the run's model artifact: a monitored callback's best file with alias ``best``, an
        unmonitored one's file (``last.ckpt``) with alias ``last``."""
        import wandb

        if self._run is None:
            return
        if callback.monitor:
            files = {str(p): ["top_k"] for p in callback.best_k_models}
            files[str(callback.best_model_path)] = ["best"]
        else:
            files = {str(callback.best_model_path): ["last"]}
        for path, aliases in files.items():
            if not path or not Path(path).is_file():
                continue
            mtime = Path(path).stat().st_mtime
            if self._logged_files.get(path) == mtime:
                continue
            score = callback.best_model_score if "best" in aliases else None
            artifact = wandb.Artifact(
                name=f"model-{self._run.id}",
                type="model",
                metadata={
                    "original_filename": Path(path).name,
                    "monitor": callback.monitor,
                    "score": None if score is None else float(score),
                },
            )
            artifact.add_file(path, name="model.ckpt")
            self._run.log_artifact(artifact, aliases=aliases)
            self._logged_files[path] = mtime

    def finish(self, exit_code: int | None = None) -> None:
        """End the run (``wandb.finish``); log how to upload it when it was logged offline."""
        run, self._run = self._run, None
        if run is None:
            return
        offline = bool(getattr(run, "offline", False))
        run_dir = getattr(run, "dir", None)
        run.finish(exit_code=exit_code)
        if offline and run_dir:
            path = Path(run_dir).parent  # .../wandb/offline-run-<time>-<id>
            self.sync_hint = f"wandb sync {path}"
            log.info("W&B run logged offline in %s; upload it with: %s", path, self.sync_hint)


def wandb_run_state(loggers: Sequence[Any]) -> dict[str, str] | None:
    """``{"id", "project"}`` of the W&B run of ``loggers`` (None without a started run)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger) and lg.run_id is not None:
            return {"id": lg.run_id, "project": str(lg.name or "")}
    return None


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` (event files in ``<save_dir>/<name>/<version>``) whose
    missing dependency fails with the extra to install (``pip install 'itm[tensorboard]'``).

    Args:
        save_dir, name, version, default_hp_metric, **kwargs: see
            ``lightning.pytorch.loggers.TensorBoardLogger``.
    """

    def __init__(
        self,
        save_dir: str,
        name: str = "tensorboard",
        version: int | str | None = "",
        default_hp_metric: bool = False,
        **kwargs: Any,
    ) -> None:
        if not (extra_available("tensorboard") or extra_available("tensorboardX")):
            raise MissingExtraError(
                "logger=tensorboard needs the 'tensorboard' extra (tensorboard is not "
                "installed): pip install 'itm[tensorboard]'"
            )
        super().__init__(
            save_dir=save_dir,
            name=name,
            version=version,
            default_hp_metric=default_hp_metric,
            **kwargs,
        )


def instantiate_loggers(
    cfg: DictConfig | Mapping[str, Any] | None, wandb_run: Mapping[str, Any] | None = None
) -> list:
    """Build every logger of the ``logger`` group (a dict of nodes; empty / null = no logging).

    ``wandb_run`` (a resumed checkpoint's :data:`WANDB_RUN_KEY` entry): a W&B logger without an
    explicit ``id`` continues that run.
    """
    if not cfg:
        return []
    loggers = []
    for name, node in cfg.items():
        if node is None or "_target_" not in node:
            continue
        extra: dict[str, Any] = {}
        if wandb_run and str(node["_target_"]).endswith("WandbLogger") and not node.get("id"):
            extra["id"] = str(wandb_run["id"])
            log.info("logger %s: continuing the checkpoint's W&B run %s", name, extra["id"])
        loggers.append(instantiate(node, **extra))
    return loggers
