"""W&B offline logging (metrics, config, summary, alignment pictures), run finishing, the
no-account fallback, alignment maps of every head, and progress bars off without a TTY."""

from __future__ import annotations

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
    for k in ("train/loss", "train/lr", "train/epoch_time_s", "train/samples_per_s"):
        assert k in keys, k
    for split in ("dev", "test"):
        assert f"{split}/rsum" in keys
        for k in RECALL:
            assert f"{split}/{k}" in keys, (split, k)
    assert "dev/alignment" in {k.rsplit("/", 1)[0] for k in keys if k.startswith("dev/alignment")}
    # the resolved config, nested
    assert run.config["model"]["align"]["_target_"].endswith("SCAN")
    assert run.config["trainer"]["max_epochs"] == 2
    # summary: best dev rsum (define_metric max) and the returned objective
    _, dev_rsums = run.series("dev/rsum")
    assert run.summary["dev/rsum"]["max"] == pytest.approx(max(dev_rsums))
    assert run.summary["dev/best_rsum"] == pytest.approx(metrics["dev/best_rsum"])
    assert metrics["dev/best_rsum"] == pytest.approx(max(dev_rsums))
    # checkpoint artifacts (log_model=true), logged offline and uploaded by `wandb sync`
    log = next((tmp_path / "wandb").glob("*/run-*.wandb"))
    aliases = [
        set(r.artifact.aliases)
        for r in read_wandb_records(log)
        if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"
    ]
    assert {"best", "latest"} in aliases


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


def test_no_account_falls_back_to_offline(compose, tmp_path, monkeypatch, capsys):
    from itm.utils import instantiate_loggers

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = _cfg(compose, tmp_path)
    (logger,) = instantiate_loggers(cfg.logger)
    assert logger.is_offline and logger._wandb_init["mode"] == "offline"
    assert "offline" in capsys.readouterr().out
    assert logger._experiment is None  # nothing started yet


def test_multirun_group_and_name_default_to_the_sweep(monkeypatch, tmp_path):
    from itm import loggers

    monkeypatch.setattr(loggers, "hydra_sweep_group_and_name", lambda: ("train-sweep1", "0-a=1"))
    lg = loggers.WandbLogger(save_dir=str(tmp_path), offline=True, tags=["x"])
    assert lg._wandb_init["group"] == "train-sweep1" and lg._wandb_init["name"] == "0-a=1"
    assert lg._wandb_init["tags"] == ["x"] and lg._wandb_init["project"] == "itm"
    explicit = loggers.WandbLogger(save_dir=str(tmp_path), group="mine", name="run")
    assert explicit._wandb_init["group"] == "mine" and explicit._wandb_init["name"] == "run"


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
    from itm.callbacks import RichProgress, progress_enabled, scoring_progress

    assert not progress_enabled("auto")  # pytest: no TTY
    assert not RichProgress().is_enabled
    monkeypatch.setenv("ITM_PROGRESS", "1")
    assert RichProgress().is_enabled
    assert not RichProgress(enable=False).is_enabled

    class Module:  # not attached to a trainer
        _trainer = None

    with scoring_progress(Module(), 100) as progress:
        assert progress is None
