"""Training as a plain function: ``train(cfg) -> metrics`` (the Hydra entry point is thin)."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from itm.models.module import ITMModule
from itm.utils import format_metrics_table, instantiate_loggers

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate ``cfg.data``, give it the text encoder's tokenizer when the encoder brings
    one (BERT), and copy the data's sizes (vocabulary, region feature size) into the model
    config."""
    dm = instantiate(cfg.data, _convert_="all")
    text_cfg = cfg.model.text_encoder
    if "path" in text_cfg:
        # A pretrained (BERT) text encoder brings its own tokenizer from the same directory.
        from itm.data.tokenizers import BertCaptionTokenizer

        dm.tokenizer = BertCaptionTokenizer(text_cfg.path)
    with open_dict(cfg):
        if "vocab_size" in cfg.model.text_encoder and hasattr(dm, "vocab_size"):
            cfg.model.text_encoder.vocab_size = dm.vocab_size
        if "img_dim" in cfg.model.image_encoder and hasattr(dm, "img_dim"):
            cfg.model.image_encoder.img_dim = dm.img_dim
    return dm


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a model, evaluate the best checkpoint on the test split, return all metrics.

    Returns a flat dict: ``dev/best_rsum`` (the model-selection objective), every ``test/*``
    figure (when ``cfg.test``), and ``ckpt_path`` of the best checkpoint is logged.
    """
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        metrics: dict[str, float] = {}
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
            metrics["dev/best_rsum"] = float(ckpt_cb.best_model_score)
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
                print("\n" + format_metrics_table(test, title="test") + "\n", flush=True)
                if best:
                    print(f"best checkpoint: {best}", flush=True)
        return metrics
    finally:
        for lg in loggers:
            finish = getattr(getattr(lg, "experiment", None), "finish", None)
            if "Wandb" in type(lg).__name__ and callable(finish):
                finish()
