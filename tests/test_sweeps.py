"""Hydra sweeps: a grid multirun gives one directory and one W&B run per job (grouped by the
sweep), an Optuna TPE search runs with sqlite storage, and the SLURM launcher config composes;
reading runs back for comparison."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import run_train_cli
from itm.runs import (
    load_csv_runs,
    load_wandb_export,
    load_wandb_offline,
    method_labels,
    read_wandb_records,
    results_table,
)

FAST = [
    "debug=fast",
    "model.embed_size=32",
    "model.text_encoder.word_dim=16",
    "trainer.log_every_n_steps=1",
    "test=false",
]


def _sweep(tmp_path) -> tuple[Path, list[Path]]:
    (sweep,) = (tmp_path / "train" / "multiruns").iterdir()
    return sweep, sorted(
        (p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
    )


def test_grid_multirun_one_dir_and_one_wandb_run_per_job(tmp_path):
    proc = run_train_cli(
        ["-m", "model/align=scan,chan", "pooling=lse", "logger=csv_wandb", *FAST], tmp_path
    )
    sweep, jobs = _sweep(tmp_path)
    assert [j.name for j in jobs] == ["0", "1"]
    groups, names, ids = set(), set(), set()
    for job in jobs:
        (log,) = job.glob("wandb/offline-run-*/run-*.wandb")  # exactly one run per job
        records = list(read_wandb_records(log))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        groups.add(run.run_group)
        names.add(run.display_name)
        ids.add(run.run_id)
        assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]
    assert groups == {f"train-{sweep.name}"}
    assert len(names) == 2 and len(ids) == 2
    assert proc.stdout.count("wandb sync") == 2  # how to upload, per job
    # read back for comparison: CSV logs and the offline W&B runs agree
    csv_runs, wb_runs = load_csv_runs(sweep), load_wandb_offline(sweep)
    assert method_labels(csv_runs) == ["align=scan", "align=chan"]
    assert [r.best("dev/rsum") for r in csv_runs] == pytest.approx(
        [r.best("dev/rsum") for r in wb_runs]
    )
    table = results_table(csv_runs, split="dev")
    assert {row["method"] for row in table} == {"align=scan", "align=chan"}


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="needs the optuna extra: pip install -e '.[optuna]'",
)
def test_optuna_search_three_trials_with_sqlite_storage(tmp_path):
    import optuna

    db = tmp_path / "optuna.db"
    run_train_cli(
        [
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=2",
            f"hydra.sweeper.storage=sqlite:///{db}",
            "logger=csv",
            *FAST,
        ],
        tmp_path,
    )
    sweep, jobs = _sweep(tmp_path)
    assert len(jobs) == 3
    study = optuna.load_study(study_name="itm_train", storage=f"sqlite:///{db}")
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3
    assert set(trials[0].params) == {
        "model.optimizer.lr",
        "model.loss.margin",
        "model.align.lambda_softmax",
        "model.pooling.lambda_lse",
    }
    lrs = {t.params["model.optimizer.lr"] for t in trials}
    assert len(lrs) == 3 and all(5e-5 <= lr <= 5e-3 for lr in lrs)
    # the objective of each trial is the job's best dev rsum
    best = {round(r.best("dev/rsum"), 4) for r in load_csv_runs(sweep)}
    assert {round(t.value, 4) for t in trials} == best
    assert (sweep / "optimization_results.yaml").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="needs the slurm extra: pip install -e '.[slurm]'",
)
def test_slurm_launcher_config():
    import hydra_plugins.hydra_submitit_launcher.config  # noqa: F401  (registers the configs)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(
                "train",
                overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4 and launcher.nodes == 1
    assert cfg.trainer.strategy.process_group_backend == "nccl"


def test_wandb_panel_export_is_read(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text(
        "Step,run-a - dev/rsum,run-a - dev/rsum__MIN,run-a - dev/rsum__MAX,run-b - dev/rsum\n"
        "0,100,100,100,90\n1,150,150,150,\n2,140,140,140,170\n"
    )
    runs = load_wandb_export(path)
    assert [r.name for r in runs] == ["run-a", "run-b"]
    assert runs[0].series("dev/rsum") == ([0.0, 1.0, 2.0], [100.0, 150.0, 140.0])
    assert runs[1].best("dev/rsum") == 170.0
    table = results_table(runs, split="dev")
    assert [row["method"] for row in table] == ["run=run-b", "run=run-a"]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="needs the slurm extra: pip install -e '.[slurm]'",
)
def test_submitit_launcher_runs_a_sweep_as_jobs(tmp_path):
    """The cluster path without a cluster: submitit's local executor runs each job (~40 s)."""
    run_train_cli(
        ["-m", "hydra/launcher=slurm_local", "model/align=scan,chan", "logger=csv", *FAST], tmp_path
    )
    sweep, jobs = _sweep(tmp_path)
    assert [j.name for j in jobs] == ["0", "1"]
    assert all((j / "checkpoints" / "best.ckpt").exists() for j in jobs)
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))
