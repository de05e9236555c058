"""The command line and the package: configs from the installed package (``pkg://itm.conf``) with a
user's config directory on top, the version from the package metadata, user errors as one line
without a traceback, optional extras that name what to install, the TensorBoard logger, and the
DDP-under-Hydra launch (config flags kept in the child command, the private hook guarded)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF_DIR, ROOT, run_train_cli


@pytest.fixture
def clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def test_configs_come_from_the_package(clean_hydra):
    """``itm.conf`` is the repository's ``conf/`` (editable install) and composes ``train``."""
    import importlib.resources

    import itm.conf

    root = importlib.resources.files(itm.conf)
    assert (root / "train.yaml").is_file() and (root / "model" / "align" / "scan.yaml").is_file()
    packaged = sorted(str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*.yaml") if p.is_file())
    assert packaged and all((root / p).is_file() for p in packaged)
    with initialize_config_module(version_base="1.3", config_module="itm.conf"):
        cfg = compose("train", overrides=["model/align=chan", "pooling=avg"])
    assert cfg.model.align._target_.endswith("CHAN") and cfg.task_name == "train"


def test_version_comes_from_the_package_metadata():
    import itm

    assert itm.__version__ == importlib.metadata.version("itm") != "0+unknown"


def test_user_config_dir_goes_on_top(tmp_path, monkeypatch):
    """``$ITM_CONFIG_DIR`` (or ``--config-dir``): its files first, itm's for everything else."""
    from itm.cli import with_user_config_dir

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nmodel:\n  embed_size: 48\n"
    )
    monkeypatch.setenv("ITM_CONFIG_DIR", str(tmp_path))
    argv = with_user_config_dir(["itm-train", "experiment=mine"])
    assert argv == ["itm-train", f"--config-dir={tmp_path.resolve()}", "experiment=mine"]
    assert with_user_config_dir(["itm-train", "-cd", "x"]) == ["itm-train", "-cd", "x"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=mine", "--cfg", "job"],
        cwd=tmp_path,
        env={**os.environ, "ITM_CONFIG_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "embed_size: 48" in proc.stdout and "SCAN" in proc.stdout  # the rest from itm


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data=precomp"], "itm-train: error: missing mandatory value data.root"),
        (["data=precomp", "data.root={tmp}"], "itm-train: error: {tmp}: vocabulary missing"),
        (["+model.align.foo=1"], "unexpected keyword argument 'foo'"),
        (["ckpt_path={tmp}/nope.ckpt"], "itm-train: error: ckpt_path={tmp}/nope.ckpt: no such"),
    ],
    ids=["missing-value", "data-error", "unknown-option", "no-checkpoint"],
)
def test_user_errors_print_one_line_without_traceback(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    proc = run_train_cli([*args, "debug=fast"], tmp_path, timeout=180, check=False)
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and message.format(tmp=tmp_path) in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_full_error_shows_the_traceback(tmp_path):
    env_before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        proc = run_train_cli(["data=precomp", "debug=fast"], tmp_path, timeout=180, check=False)
    finally:
        if env_before is None:
            os.environ.pop("HYDRA_FULL_ERROR")
        else:
            os.environ["HYDRA_FULL_ERROR"] = env_before
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "MissingMandatoryValue" in proc.stderr


def test_unknown_config_key_is_reported_by_hydra_without_traceback(tmp_path):
    proc = run_train_cli(["trainer.max_epoch=3"], tmp_path, timeout=120, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Could not override 'trainer.max_epoch'" in proc.stderr


@pytest.mark.parametrize(
    ("override", "extra"),
    [
        ("hparams_search=optuna", "optuna"),
        ("hparams_search=optuna_chan", "optuna"),
        ("hydra/launcher=slurm", "slurm"),
        ("hydra/launcher=slurm_local", "slurm"),
        ("logger=tensorboard", "tensorboard"),
    ],
)
def test_missing_extras_name_what_to_install(monkeypatch, override, extra):
    from itm import errors
    from itm.cli import check_extras

    check_extras([override])  # installed here (dev extras): nothing to say
    monkeypatch.setattr(errors, "extra_available", lambda module: False)
    with pytest.raises(errors.MissingExtraError, match=rf"pip install 'itm\[{extra}\]'"):
        check_extras(["debug=fast", override])


def test_missing_extra_is_one_line_on_the_command_line(tmp_path):
    """The TensorBoard logger without tensorboard (hidden from the child process)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nsys.modules['tensorboard'] = None\nsys.modules['tensorboardX'] = None\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "logger=tensorboard", "debug=fast"],
        cwd=tmp_path,
        env={**env, "ITM_LOG_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "itm-train: error: logger=tensorboard needs the 'tensorboard' extra" in proc.stderr
    assert "pip install 'itm[tensorboard]'" in proc.stderr and "Traceback" not in proc.stderr


def test_tensorboard_logger_writes_event_files(compose, tmp_path):
    pytest.importorskip("tensorboard")
    from omegaconf import open_dict

    from itm.train import train

    cfg = compose(
        ["debug=fast", "model.embed_size=16", "model.text_encoder.word_dim=8", "logger=tensorboard"]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    train(cfg)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_tensorboard_logger_without_tensorboard_names_the_extra(monkeypatch, tmp_path):
    from itm import loggers
    from itm.errors import MissingExtraError

    monkeypatch.setattr(loggers, "extra_available", lambda module: False)
    with pytest.raises(MissingExtraError, match=r"pip install 'itm\[tensorboard\]'"):
        loggers.TensorBoardLogger(save_dir=str(tmp_path))


# --- DDP under Hydra --------------------------------------------------------------------------


def test_ddp_child_command_keeps_the_config_flags():
    from itm.distributed import hydra_config_flags

    argv = [
        "--config-dir",
        "/my/conf",
        "-cn",
        "mytrain",
        "--config-path=pkg://itm.conf",
        "-m",
        "model/align=scan,chan",
    ]
    assert hydra_config_flags(argv) == [
        "--config-path=pkg://itm.conf",
        "--config-name=mytrain",
        "--config-dir=/my/conf",
    ]
    assert hydra_config_flags(["model/align=scan", "--cfg", "job"]) == []


def test_ddp_launch_hook_is_guarded(monkeypatch):
    """The one private Lightning function itm replaces: gone or changed -> a loud error naming
    the Lightning version (not a silently broken launch)."""
    import lightning
    from lightning.pytorch.strategies.launchers import subprocess_script

    from itm.distributed import hydra_job_command, install_hydra_ddp_launcher

    install_hydra_ddp_launcher()
    assert subprocess_script._hydra_subprocess_cmd is hydra_job_command
    install_hydra_ddp_launcher()  # idempotent
    monkeypatch.delattr(subprocess_script, "_hydra_subprocess_cmd")
    with pytest.raises(RuntimeError, match=f"lightning {lightning.__version__} no longer has"):
        install_hydra_ddp_launcher()
    monkeypatch.setattr(
        subprocess_script, "_hydra_subprocess_cmd", lambda rank, extra: None, raising=False
    )
    with pytest.raises(RuntimeError, match="no longer has"):
        install_hydra_ddp_launcher()


def test_single_process_runs_do_not_touch_the_launcher(compose):
    from lightning.pytorch import Trainer

    from itm.distributed import needs_hydra_ddp_launcher

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert not needs_hydra_ddp_launcher(trainer)


def test_config_dir_is_the_packaged_config_directory():
    from pathlib import Path

    from itm.cli import config_dir

    assert Path(config_dir()).resolve() == CONF_DIR.resolve()  # editable install: the checkout's
    assert (Path(config_dir()) / "train.yaml").is_file()
