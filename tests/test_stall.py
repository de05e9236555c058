"""The stall warning: a run whose losses sit at 2 x margin x batch (every score equal) is told
once, in the log and the epoch summary, to use model.warmup_epochs; a healthy run is not."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from itm.callbacks import EpochSummary
from itm.models.loss import ContrastiveLoss
from itm.models.module import ITMModule
from itm.stall import StallWarning, collapse_loss
from itm.train import build_datamodule

TINY = [
    "model.embed_size=16",
    "model.text_encoder.word_dim=8",
    "data.n_train=48",
    "data.n_dev=8",
    "data.n_test=8",
    "data.batch_size=16",
]


def test_collapse_value_is_the_loss_of_equal_scores():
    for n in (2, 5, 16):
        sims = torch.full((n, n), 0.3)
        for hardest in (True, False):
            loss = ContrastiveLoss(margin=0.2)(sims, max_violation=hardest)
            assert float(loss) == pytest.approx(collapse_loss(0.2, n, hardest))


def _run(compose, collapse: bool, caplog, epochs: int = 3, extra=()):
    cfg = compose([*TINY, *extra])
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    if collapse:  # collapsed embeddings: every score of every batch equal (gradients still flow)
        real = model.similarity.forward

        def equal_scores(img, il, cap, cl):
            s = real(img, il, cap, cl)
            return s * 0.0 + 0.5

        model.similarity.forward = equal_scores  # type: ignore[method-assign]
    stall = StallWarning()
    summary = EpochSummary(enable=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=[stall, summary],
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(model, datamodule=dm)
    return stall, caplog.records


@pytest.mark.parametrize("warmup", [0, 1])
def test_a_collapsed_run_warns_once_naming_warmup_epochs(compose, caplog, warmup):
    stall, records = _run(compose, True, caplog, extra=[f"model.warmup_epochs={warmup}"])
    warned = [r for r in records if r.levelno == logging.WARNING and "stalled" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    text = warned[0].getMessage()
    assert "model.warmup_epochs" in text and "2 x margin" in text
    assert stall.stalled_epoch == 0 and stall.message == text
    lines = [r.getMessage() for r in records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 3
    assert "STALLED" in lines[0] and "model.warmup_epochs" in lines[0]
    assert not any("STALLED" in line for line in lines[1:])  # said once


def test_a_healthy_run_does_not_warn(compose, caplog):
    stall, records = _run(compose, False, caplog)
    assert stall.message is None
    assert not any("stalled" in r.getMessage() for r in records)
    assert not any("STALLED" in r.getMessage() for r in records)


def test_on_by_default(compose):
    cfg = compose(TINY)
    names = list(cfg.callbacks)
    assert isinstance(instantiate(cfg.callbacks.stall_warning), StallWarning)
    assert names.index("stall_warning") < names.index("epoch_summary")
