"""Training as a plain function: ``train(cfg) -> metrics`` (the Hydra entry point is thin)."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from itm.checkpoint import prepare_resume, resolve_resume_path
from itm.data.build import build_datamodule as _build_datamodule
from itm.distributed import (
    install_hydra_ddp_launcher,
    needs_hydra_ddp_launcher,
    release_job_processes,
    set_resume_path,
)
from itm.loggers import WANDB_RUN_KEY, instantiate_loggers
from itm.models.module import ITMModule
from itm.utils import format_metrics_table

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The run's DataModule (:func:`itm.data.build.build_datamodule`: the data node, the text
    encoder's tokenizer, the image encoder's per-region inputs), with the data's sizes
    (vocabulary, region feature size) copied into the model config."""
    dm = _build_datamodule(cfg.data, cfg.model)
    with open_dict(cfg):
        if "vocab_size" in cfg.model.text_encoder and hasattr(dm, "vocab_size"):
            cfg.model.text_encoder.vocab_size = dm.vocab_size
        if "img_dim" in cfg.model.image_encoder and hasattr(dm, "img_dim"):
            cfg.model.image_encoder.img_dim = dm.img_dim
    return dm


def _progress_bar_kwargs(cfg: DictConfig, callbacks: list) -> dict:
    """``enable_progress_bar=False`` when no progress-bar callback is configured and stdout is not
    a terminal (Lightning's default tqdm bar would flood CI / SLURM logs)."""
    from lightning.pytorch.callbacks import ProgressBar

    from itm.callbacks import progress_enabled

    if "enable_progress_bar" in cfg.trainer or any(isinstance(c, ProgressBar) for c in callbacks):
        return {}
    return {} if progress_enabled("auto") else {"enable_progress_bar": False}


def finish_loggers(loggers: list, failed: bool = False) -> None:
    """End every W&B run of ``loggers`` (exit code 1 after a failure): itm's loggers through
    their ``finish``, a plain Lightning ``WandbLogger`` through ``wandb.finish``."""
    from lightning.pytorch.loggers import WandbLogger

    code = 1 if failed else 0
    plain_wandb = False
    for lg in loggers:
        finish = getattr(lg, "finish", None)
        if callable(finish):
            finish(exit_code=code)
        elif isinstance(lg, WandbLogger):
            plain_wandb = True
    if plain_wandb:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=code)


def drop_callbacks_needing_a_logger(callbacks: list, loggers: list) -> list:
    """``LearningRateMonitor`` refuses a trainer without loggers (``logger=none``): drop it."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    if loggers:
        return callbacks
    kept = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if len(kept) < len(callbacks):
        log.info("no logger: the learning-rate monitor is off")
    return kept


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a model, evaluate the best checkpoint on the test split, return all metrics.

    Returns a flat dict: ``dev/best_rsum`` (the model-selection objective), every ``test/*``
    figure (when ``cfg.test``), and ``ckpt_path`` of the best checkpoint is logged.

    Every W&B run is finished when this returns or raises (one run per multirun job). Under
    ``strategy=ddp`` the other ranks are started for this job only and released at its end
    (:mod:`itm.distributed`).
    """
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    loggers: list = []
    trainer: pl.Trainer | None = None
    failed = False
    try:
        # ckpt_path=last -> the newest last.ckpt (in a multirun: of this job's own runs)
        ckpt_path = resolve_resume_path(cfg)
        set_resume_path(ckpt_path)  # DDP ranks started from here resume the same file
        dm = build_datamodule(cfg)
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        assert isinstance(model_cfg, dict)
        model = ITMModule(model_cfg)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
        resumed: dict = {}
        if ckpt_path is not None:  # readable, same architecture; checkpoints continue in place
            resumed = prepare_resume(ckpt_path, model.cfg, callbacks)
        # a resumed W&B run continues (its id is stored in every checkpoint)
        loggers = instantiate_loggers(cfg.get("logger"), wandb_run=resumed.get(WANDB_RUN_KEY))
        callbacks = drop_callbacks_needing_a_logger(callbacks, loggers)
        trainer = instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            **_progress_bar_kwargs(cfg, callbacks),
        )
        if needs_hydra_ddp_launcher(trainer):  # Lightning re-runs the script for ranks 1..N-1
            install_hydra_ddp_launcher()
        for lg in loggers:
            # the resolved config as a nested dict (W&B shows it as a tree)
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        metrics: dict[str, float] = {}
        ckpt_cb = trainer.checkpoint_callback
        if not isinstance(ckpt_cb, ModelCheckpoint):  # none configured
            ckpt_cb = None
        monitor = getattr(ckpt_cb, "monitor", None) or "dev/rsum"
        if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
            # the best of the monitored figure, named after it (dev/best_rsum by default)
            metrics[monitor.replace("/", "/best_", 1)] = float(ckpt_cb.best_model_score)
        elif "dev/rsum" in trainer.callback_metrics:
            metrics["dev/best_rsum"] = float(trainer.callback_metrics["dev/rsum"])
        if cfg.get("test", True):
            best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
            trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=False)
            test = {
                k.split("/", 1)[1]: float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith("test/")
            }
            metrics.update({f"test/{k}": v for k, v in test.items()})
            if trainer.is_global_zero:
                log.info("\n%s\n", format_metrics_table(test, title="test"))
                rr = {k[3:]: v for k, v in test.items() if k.startswith("rr_")}
                if rr:  # model.eval_rerank: MTFN re-ranked figures of the same matrix
                    title = "test rr ORACLE" if rr.get("oracle") else "test rr"
                    log.info("%s\n", format_metrics_table(rr, title=title))
                if best:
                    log.info("best checkpoint: %s", best)
        for lg in loggers:
            if hasattr(lg, "log_summary"):
                lg.log_summary(metrics)
        return metrics
    except BaseException:
        failed = True
        raise
    finally:
        finish_loggers(loggers, failed)
        if trainer is not None:
            release_job_processes(trainer, failed=failed)
