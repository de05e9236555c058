"""DDP evaluation: 2 CPU processes (``ddp_spawn``, gloo) give exactly the single-process
metrics; each rank scores its slice of image rows, embeddings are gathered in dataset order
with the DistributedSampler's padding duplicates removed (21 images: one duplicate)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from itm.models.module import ITMModule
from itm.train import build_datamodule


def _trainer(**kw):
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


@pytest.mark.parametrize("align", ["scan", pytest.param("chan", marks=pytest.mark.slow)])
def test_ddp_spawn_metrics_equal_single_process(compose, align):
    cfg = compose(
        [
            f"model/align={align}",
            "model.embed_size=32",
            "model.text_encoder.word_dim=16",
            "data.n_train=30",
            "data.n_dev=21",
            "data.n_test=21",
            "data.eval_batch_size=8",
            "model.eval_max_block_mb=0.05",  # many blocks
        ]
    )
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    single = _trainer(devices=1).test(model, datamodule=dm, verbose=False)[0]
    ddp = _trainer(devices=2, strategy="ddp_spawn").test(model, datamodule=dm, verbose=False)[0]
    assert set(single) == set(ddp) and any(k.endswith("rsum") for k in single)
    for key, value in single.items():
        assert ddp[key] == value, (key, ddp[key], value)
