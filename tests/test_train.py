"""End-to-end: configs compose, the CLI runs as documented, and the model LEARNS."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from conftest import run_train_cli
from itm.models import Similarity
from itm.models.module import ITMModule
from itm.train import train

# A small, fast model on a small synthetic world (seconds per epoch on one core).
TINY = [
    "model.embed_size=64",
    "model.text_encoder.word_dim=32",
    "data.n_train=500",
    "data.n_concepts=24",
    "data.n_dev=40",
    "data.n_test=40",
    "data.batch_size=32",
    "logger=csv",
]
CHANCE_RSUM_40 = 6 * 100 * (1 + 5 + 10) / 3 / 40  # ~ K/N per R@K, both directions: 80


def _cfg(compose, tmp_path, overrides):
    cfg = compose(TINY + overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_public_contract_composes(compose):
    cfg = compose(["model/align=scan", "pooling=lse"])
    sim = Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling))
    assert cfg.model.align.direction == "t2i" and cfg.model.align.lambda_softmax == 9.0
    assert cfg.model.align.feature_norm == "clipped_l2norm"
    assert cfg.model.pooling.lambda_lse == 6.0 and cfg.model.pooling.rescale is True
    assert cfg.model.embed_size == 1024
    assert cfg.model.image_encoder.embed_size == 1024 == cfg.model.text_encoder.embed_size
    img, cap = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(4, 5, 8, dtype=torch.float64)
    out = sim(img, torch.tensor([3, 1]), cap, torch.tensor([5, 1, 2, 3]))
    assert out.shape == (2, 4) and out.dtype == torch.float64


@pytest.mark.parametrize("pool", ["avg", "max", "sum", "lse"])
def test_pooling_group_packaged_at_model_pooling(compose, pool):
    cfg = compose([f"pooling={pool}"])
    assert "pooling" not in cfg or cfg.get("pooling") is None
    assert cfg.model.pooling._target_.startswith("itm.models.pooling.")


def test_training_learns_far_above_chance(compose, tmp_path):
    """A short run on synthetic data must lift test rsum far above chance (~80 here)."""
    cfg = _cfg(
        compose,
        tmp_path,
        ["trainer.max_epochs=8", "model.optimizer.lr=2e-3", "seed=1"],
    )
    metrics = train(cfg)
    assert metrics["test/rsum"] > 4 * CHANCE_RSUM_40, metrics
    assert metrics["dev/best_rsum"] > 4 * CHANCE_RSUM_40
    # logged: train loss, lr, epoch time, throughput and every recall figure
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    keys = set().union(*(r.keys() for r in rows))
    for k in (
        "train/loss",
        "train/loss_epoch",
        "train/lr",
        "train/epoch_time_s",
        "train/samples_per_s",
        "train/dev_time_s",
        "train/dev_scoring_time_s",
        "dev/rsum",
        "dev/i2t_r1",
        "dev/t2i_medr",
        "test/rsum",
    ):
        assert k in keys, k
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[-1] < losses[0]
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    assert ckpt.exists() and (tmp_path / "checkpoints" / "last.ckpt").exists()
    # the best checkpoint reloads with weights_only and scores like the trained model
    model = ITMModule.load_from_checkpoint(ckpt, weights_only=True)
    assert model.cfg["embed_size"] == 64


def test_untrained_model_is_near_chance(compose, tmp_path):
    """The learning test above can fail: without training, rsum stays near chance."""
    cfg = _cfg(compose, tmp_path, ["trainer.max_epochs=1", "trainer.limit_train_batches=0"])
    metrics = train(cfg)
    assert metrics["test/rsum"] < 2 * CHANCE_RSUM_40, metrics


@pytest.mark.parametrize(
    "args",
    [
        ["model/align=scan", "model.align.direction=i2t", "pooling=avg"],
        ["model/align=scan", "model.align.direction=i2t", "pooling=lse"],
        ["model/align=scan", "model.align.direction=both"],
    ],
    ids=["i2t-avg", "i2t-lse", "both"],
)
def test_cli_commands_from_the_issue(tmp_path, args):
    out = run_train_cli([*args, "debug=fast"], tmp_path).stdout
    assert "rsum" in out and "i2t" in out
    # no terminal: one summary line per epoch instead of a progress bar
    line = r"^epoch 1/1  loss \d+\.\d+  lr \S+  dev rsum \d+\.\d \(best \d+\.\d\)  train \d+\.\d s \(\d+ pairs/s\)  dev \d+\.\d s$"
    assert re.search(line, out, re.M), out
    runs = list(Path(tmp_path).glob("train/runs/*/checkpoints/best.ckpt"))
    assert len(runs) == 1


def test_cli_unknown_option_fails_clearly(tmp_path):
    proc = run_train_cli(["model/align=nope"], tmp_path, timeout=120, check=False)
    assert proc.returncode != 0
    assert "nope" in proc.stderr and "model/align" in proc.stderr
