"""Training logs that tell the truth (issue 20): the epoch loss is the batch-size-weighted mean of
the per-batch (summed) losses, not the last batch's; the epoch's training time leaves out the
validation run inside it, which is timed on its own; the learning rate of every parameter group
is logged."""

from __future__ import annotations

import csv
import logging
import re
import time

import pytest
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from itm.train import train

# 2 images x 5 captions = 10 training pairs at batch 4: batches of 4, 4 and 2 pairs
TEN_PAIRS = [
    "debug=fast",
    "data.n_train=2",
    "data.n_dev=8",
    "data.n_test=8",
    "data.batch_size=4",
    "trainer.limit_train_batches=null",
    "trainer.log_every_n_steps=1",
    "model.embed_size=16",
    "logger=csv",
    "test=false",
    "callbacks.progress_bar=null",
    "callbacks.alignment_images=null",
    "callbacks.epoch_summary.enable=true",
]


class BatchLosses(Callback):
    """Records (batch size, loss) of every training step."""

    instances: list[BatchLosses] = []

    def __init__(self) -> None:
        self.batches: list[tuple[int, float]] = []
        BatchLosses.instances.append(self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append((int(batch["images"].shape[0]), float(outputs["loss"])))


class SlowValidation(Callback):
    """Makes every validation of a training epoch take ``seconds`` longer; records the wall time
    of each training epoch (validation included)."""

    instances: list[SlowValidation] = []

    def __init__(self, seconds: float = 2.0) -> None:
        self.seconds = float(seconds)
        self.epoch_wall: list[float] = []
        SlowValidation.instances.append(self)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            time.sleep(self.seconds)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_wall.append(time.perf_counter() - self._t0)


def _cfg(compose, tmp_path, extra, text=("model.text_encoder.word_dim=8",)):
    cfg = compose([*TEN_PAIRS, *text, *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def _rows(tmp_path) -> list[dict[str, str]]:
    with open(tmp_path / "csv" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _summary_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]


def test_epoch_loss_is_the_sample_weighted_mean_not_the_last_batch(compose, tmp_path, caplog):
    BatchLosses.instances.clear()
    caplog.set_level(logging.INFO, logger="itm")
    train(_cfg(compose, tmp_path, ["+callbacks.losses._target_=test_training_logs.BatchLosses"]))
    (recorder,) = BatchLosses.instances
    sizes = [n for n, _ in recorder.batches]
    losses = [v for _, v in recorder.batches]
    assert sizes == [4, 4, 2]  # a last batch smaller than the others
    # by hand: each batch's summed loss weighted by its number of pairs
    mean = sum(n * v for n, v in recorder.batches) / sum(sizes)
    rows = _rows(tmp_path)
    (epoch_row,) = [r for r in rows if r.get("train/loss_epoch")]
    logged = float(epoch_row["train/loss_epoch"])
    assert logged == pytest.approx(mean, rel=1e-6)
    assert abs(logged - losses[-1]) > 1e-3 * max(1.0, abs(mean))  # not the last batch's value
    assert abs(logged - sum(losses) / 3) > 1e-6  # weighted by batch size, not per batch
    # the per-step loss stays, one value per step
    steps = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert steps == pytest.approx(losses, rel=1e-6)
    # the summary line prints the epoch figure
    (line,) = _summary_lines(caplog)
    assert re.search(r"loss (\d+\.\d+)", line).group(1) == f"{mean:.4f}", line


def test_epoch_training_time_excludes_a_slow_validation(compose, tmp_path, caplog):
    SlowValidation.instances.clear()
    caplog.set_level(logging.INFO, logger="itm")
    slow = 2.0
    train(
        _cfg(
            compose,
            tmp_path,
            [
                "+callbacks.slow._target_=test_training_logs.SlowValidation",
                f"+callbacks.slow.seconds={slow}",
                "trainer.max_epochs=2",
            ],
        )
    )
    (clock,) = SlowValidation.instances
    rows = _rows(tmp_path)
    train_s = [float(r["train/epoch_time_s"]) for r in rows if r.get("train/epoch_time_s")]
    dev_s = [float(r["train/dev_time_s"]) for r in rows if r.get("train/dev_time_s")]
    rates = [float(r["train/samples_per_s"]) for r in rows if r.get("train/samples_per_s")]
    assert len(train_s) == len(dev_s) == len(rates) == 2
    for epoch in range(2):
        assert clock.epoch_wall[epoch] >= slow  # the validation ran inside the epoch
        assert 0 < train_s[epoch] < clock.epoch_wall[epoch] - slow + 0.05
        assert dev_s[epoch] >= slow  # timed on its own
        assert rates[epoch] == pytest.approx(10 / train_s[epoch], rel=1e-6)
    scoring = [float(r["train/dev_scoring_time_s"]) for r in rows if r.get("train/dev_time_s")]
    assert all(0 < s < d for s, d in zip(scoring, dev_s, strict=True))
    for line in _summary_lines(caplog):
        train_part = float(re.search(r"train (\d+\.\d) s", line).group(1))
        dev_part = float(re.search(r"dev (\d+\.\d) s", line).group(1))
        assert train_part < slow <= dev_part + 0.05, line


def test_every_parameter_group_lr_is_logged(compose, tmp_path, tiny_bert):
    """BERT's parameters train at lr x lr_mult in their own group: both lrs are logged."""
    cfg = _cfg(
        compose,
        tmp_path,
        [
            "model/text_encoder=bert",
            f"model.text_encoder.path={tiny_bert}",
            "model.optimizer.lr=1e-3",
            "model.text_encoder.lr_mult=0.1",
        ],
        text=(),
    )
    train(cfg)
    rows = _rows(tmp_path)
    lrs = {k: float(v) for r in rows for k, v in r.items() if k.startswith("train/lr") and v}
    assert lrs == {
        "train/lr/base": pytest.approx(1e-3),
        "train/lr/text_encoder": pytest.approx(1e-4),
    }
