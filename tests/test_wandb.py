"""W&B offline logging (metrics, config, summary, alignment pictures, checkpoint artifacts), run
finishing, authentication left to wandb, the run continued on resume, alignment maps of every
head, and progress bars off without a TTY."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from itm.runs import load_wandb_offline, read_wandb_records
from itm.train import train

TINY = [
    "debug=fast",
    "model.embed_size=32",
    "model.text_encoder.word_dim=16",
    "logger=wandb",
    "trainer.log_every_n_steps=1",
    "callbacks.alignment_images.n_examples=3",
]
RECALL = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", "t2i_r5", "t2i_r10")


def _exit_codes(tmp_path, timeout=20.0):
    """Exit codes recorded in the run's ``.wandb`` log (the wandb service may still be writing
    its last records right after ``finish`` returns: wait a little for the exit record)."""
    import time

    log = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        codes = [
            r.exit.exit_code
            for r in read_wandb_records(log)
            if r.WhichOneof("record_type") == "exit"
        ]
        if codes or time.monotonic() > deadline:
            return codes
        time.sleep(0.5)


def _run_ids(run_dir, timeout=20.0):
    """Run ids in the ``.wandb`` log of the one offline run under ``run_dir`` (waits for the
    run's exit record: the wandb service may still be writing right after ``finish``)."""
    import time

    (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = list(read_wandb_records(log))
        kinds = {r.WhichOneof("record_type") for r in records}
        if "exit" in kinds or time.monotonic() > deadline:
            return {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
        time.sleep(0.5)


def _cfg(compose, tmp_path, extra=()):
    cfg = compose([*TINY, *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def test_offline_run_holds_metrics_config_summary_and_alignment_images(compose, tmp_path):
    import wandb

    metrics = train(
        _cfg(compose, tmp_path, ["trainer.max_epochs=2", "logger.wandb.log_model=true"])
    )
    assert wandb.run is None  # finished
    assert _exit_codes(tmp_path) == [0]  # (also waits until the run's log is complete)
    (run,) = load_wandb_offline(tmp_path)
    files = sorted((tmp_path / "wandb").glob("offline-run-*/files/media/images/dev/alignment_*"))
    assert len(files) == 3 * 2  # 3 pictures per validation, 2 validations
    keys = set().union(*(h.keys() for h in run.history))
    for k in (
        "train/loss",
        "train/loss_epoch",
        "train/lr",
        "train/epoch_time_s",
        "train/samples_per_s",
        "train/dev_time_s",
    ):
        assert k in keys, k
    for split in ("dev", "test"):
        assert f"{split}/rsum" in keys
        for k in RECALL:
            assert f"{split}/{k}" in keys, (split, k)
    # (an image list's history key: dev/alignment itself, or nested below it in newer wandb)
    assert any(k == "dev/alignment" or k.startswith("dev/alignment/") for k in keys), keys
    # the resolved config, nested
    assert run.config["model"]["align"]["_target_"].endswith("SCAN")
    assert run.config["trainer"]["max_epochs"] == 2
    # summary: best dev rsum (define_metric max) and the returned objective
    _, dev_rsums = run.series("dev/rsum")
    assert run.summary["dev/rsum"]["max"] == pytest.approx(max(dev_rsums))
    assert run.summary["dev/best_rsum"] == pytest.approx(metrics["dev/best_rsum"])
    assert metrics["dev/best_rsum"] == pytest.approx(max(dev_rsums))
    # checkpoint artifacts (log_model=true), logged offline and uploaded by `wandb sync`:
    # best.ckpt as "best", last.ckpt as "last" (stock ModelCheckpoints, itm's artifact logging)
    log = next((tmp_path / "wandb").glob("*/run-*.wandb"))
    aliases = {
        json.loads(r.artifact.metadata)["original_filename"]: set(r.artifact.aliases)
        for r in read_wandb_records(log)
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"
    }
    # (wandb adds "latest" to every version it logs)
    assert set(aliases) == {"best.ckpt", "last.ckpt"}, aliases
    assert aliases["best.ckpt"] - {"latest"} == {"best"}, aliases
    assert aliases["last.ckpt"] - {"latest"} == {"last"}, aliases


class Boom(Exception):
    pass


class BoomCallback:
    """Raises at the start of training (instantiated from the config by target path)."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Boom(Callback):
            def on_train_start(self, trainer, pl_module):
                raise Boom("boom")

        return _Boom()


def test_wandb_run_finished_with_exit_code_1_when_the_job_fails(compose, tmp_path):
    import wandb

    cfg = _cfg(compose, tmp_path, ["+callbacks.boom._target_=test_wandb.BoomCallback"])
    with pytest.raises(Boom):
        train(cfg)
    assert wandb.run is None
    assert _exit_codes(tmp_path) == [1]


def test_authentication_is_left_to_wandb(compose, tmp_path, monkeypatch):
    """No API key and no netrc but a self-hosted server (WANDB_BASE_URL) or an identity token:
    itm must not force the run offline; wandb decides (and its failure becomes one clear
    error naming the fixes)."""
    from itm.errors import UserError
    from itm.loggers import WandbLogger, WandbSetupError, instantiate_loggers

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.internal")
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(tmp_path / "token.jwt"))
    cfg = _cfg(compose, tmp_path)
    (logger,) = [lg for lg in instantiate_loggers(cfg.logger) if isinstance(lg, WandbLogger)]
    assert not logger.is_offline and "mode" not in logger._wandb_init
    assert logger.run_id is None  # nothing started yet

    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(WandbSetupError, match="log in .* or log offline") as err:
        logger.experiment  # noqa: B018 - starts the run
    assert isinstance(err.value, UserError) and "api_key not configured" in str(err.value)


def test_resumed_run_continues_the_same_wandb_run(compose, tmp_path):
    """The W&B run id travels in the checkpoint; resuming it logs into the same run."""
    from itm.loggers import WANDB_RUN_KEY

    first = tmp_path / "train" / "runs" / "a"
    cfg = _cfg(compose, first, ["test=false", "callbacks.alignment_images=null"])
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path)
    train(cfg)
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    (run_id,) = _run_ids(first)
    assert ckpt[WANDB_RUN_KEY]["id"] == run_id

    second = tmp_path / "train" / "runs" / "b"
    cfg = _cfg(
        compose,
        second,
        ["test=false", "callbacks.alignment_images=null", "trainer.max_epochs=2", "ckpt_path=last"],
    )
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path)
    train(cfg)
    assert _run_ids(second) == {run_id}
    # (the offline run directory is named after the run id too)
    assert next((second / "wandb").glob("offline-run-*")).name.endswith(run_id)


# --- alignment maps ------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["scan", "bfan", "chan", "imram", "global"])
def test_attention_map_of_every_head(compose, head):
    from omegaconf import OmegaConf

    from itm.models.module import ITMModule
    from itm.viz import attention_map, figure_to_array, plot_attention

    pooling = "avg" if head in ("bfan", "global") else "lse"
    cfg = compose(
        [
            f"model/align={head}",
            f"pooling={pooling}",
            "model.embed_size=16",
            "model.text_encoder.word_dim=8",
            "model.text_encoder.vocab_size=30",
            "model.image_encoder.img_dim=12",
        ]
    )
    torch.manual_seed(0)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    img = torch.randn(7, 12)
    cap = torch.randint(4, 30, (9,))
    att = attention_map(model, img, 6, cap, 8)
    assert att.shape == (8, 6) and np.isfinite(att).all()
    direction = getattr(model.similarity.align, "direction", None)
    if head == "chan":
        assert set(np.unique(att)) <= {0.0, 1.0} and (att.sum(axis=1) == 1).all()
    elif head == "global":
        assert (np.abs(att) <= 1 + 1e-6).all()
    elif direction == "i2t":
        np.testing.assert_allclose(att.sum(axis=0), 1.0, atol=1e-5)
    else:
        np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=1e-5)
    boxes = np.array([[i * 10, 5, i * 10 + 20, 40] for i in range(6)], dtype=float)
    pic = figure_to_array(plot_attention(att, [f"w{i}" for i in range(8)], boxes=boxes, title=head))
    assert pic.ndim == 3 and pic.shape[2] == 3 and pic.dtype == np.uint8


# --- progress bars -------------------------------------------------------------------------------


def test_progress_bars_are_off_without_a_terminal(monkeypatch):
    from itm.callbacks import RichProgress, progress_enabled

    assert not progress_enabled("auto")  # pytest: no TTY
    assert not RichProgress().is_enabled
    with RichProgress().scoring_task(100) as progress:  # no bar: no progress callback
        assert progress is None
    monkeypatch.setenv("ITM_PROGRESS", "1")
    assert RichProgress().is_enabled
    assert not RichProgress(enable=False).is_enabled


def test_progress_bar_injects_scoring_progress_into_the_model(compose):
    """The bar hands the model its scoring progress while attached (no reading of the bar's
    attributes from the model), and takes it back at teardown."""
    from omegaconf import OmegaConf

    from itm.callbacks import RichProgress, no_progress
    from itm.models.module import ITMModule

    cfg = compose(["model.embed_size=8", "model.text_encoder.word_dim=4"])
    with open_dict(cfg):
        cfg.model.text_encoder.vocab_size = 10
        cfg.model.image_encoder.img_dim = 6
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    assert model.scoring_progress is no_progress
    bar = RichProgress(enable=False)

    class Trainer:
        is_global_zero = True

    bar.setup(Trainer(), model, "validate")
    assert model.scoring_progress == bar.scoring_task
    bar.teardown(Trainer(), model, "validate")
    assert model.scoring_progress is no_progress


def test_wandb_log_of_an_unknown_format_fails_clearly(tmp_path):
    """The offline-run decoder reads one log format: another version, or a record the installed
    wandb cannot decode, fails naming the supported ways to read the run."""
    import struct

    other = tmp_path / "other.wandb"
    other.write_bytes(b":W&B" + struct.pack("<HB", 0xBEE1, 7) + b"\0" * 64)
    with pytest.raises(ValueError, match="unknown format.*wandb sync"):
        list(read_wandb_records(other))
    junk = b"\xff\xff\xff"  # a truncated varint: not a protobuf message
    broken = tmp_path / "broken.wandb"
    header = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    broken.write_bytes(header + struct.pack("<IHB", 0, len(junk), 1) + junk)
    with pytest.raises(ValueError, match="cannot decode.*csv/metrics.csv"):
        list(read_wandb_records(broken))


def test_wandb_logger_writes_the_csv_log_beside(compose):
    cfg = compose(["logger=wandb"])
    assert set(cfg.logger) == {"csv", "wandb"}
