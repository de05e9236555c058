"""``ckpt_path=last`` inside a Hydra multirun: each job resumes its own earlier run (the run
with the same overrides), not the newest ``last.ckpt`` of the whole sweep."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from itm.checkpoint import resolve_resume_path
from itm.distributed import hydra_job_command, set_resume_path


def _job_dir(root: Path, sweep: str, num: int, overrides: list[str], mtime: int) -> Path:
    """A multirun job folder with .hydra/overrides.yaml and checkpoints/last.ckpt."""
    job = root / "train" / "multiruns" / sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    ckpt = job / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    os.utime(ckpt, ns=(mtime, mtime))
    return ckpt


@pytest.fixture
def in_multirun_job():
    """``set(task_overrides, output_dir)``: make HydraConfig look like a multirun job's."""

    def _set(task: list[str], output_dir: Path) -> None:
        hydra = {
            "mode": RunMode.MULTIRUN,
            "overrides": {"task": task, "hydra": []},
            "runtime": {"output_dir": str(output_dir), "cwd": str(output_dir)},
            "job": {"name": "train", "num": 0},
        }
        hc = OmegaConf.merge(OmegaConf.structured(HydraConf), hydra)
        HydraConfig.instance().set_config(OmegaConf.create({"hydra": hc}))

    yield _set
    HydraConfig.instance().cfg = None
    set_resume_path(None)
    from itm import distributed

    distributed._RESUME.clear()


def _cfg(root: Path, output_dir: Path):
    return OmegaConf.create(
        {
            "ckpt_path": "last",
            "task_name": "train",
            "paths": {"log_dir": str(root), "output_dir": str(output_dir)},
        }
    )


def test_each_job_resumes_its_own_run(tmp_path, in_multirun_job):
    # the killed sweep (launched without ckpt_path): job 1 wrote its last.ckpt after job 0
    job0 = _job_dir(tmp_path, "2026-01-01", 0, ["model.margin=0.1"], mtime=1_000_000_000)
    job1 = _job_dir(tmp_path, "2026-01-01", 1, ["model.margin=0.2"], mtime=2_000_000_000)
    # an older sweep of the same job 0: older, so not chosen
    _job_dir(tmp_path, "2025-12-01", 0, ["model.margin=0.1"], mtime=500_000_000)
    new_sweep = tmp_path / "train" / "multiruns" / "2026-01-02"
    for num, (task, want) in enumerate(
        [
            (["model.margin=0.1", "ckpt_path=last"], job0),
            (["ckpt_path=last", "model.margin=0.2"], job1),
        ]
    ):
        out = new_sweep / str(num)
        in_multirun_job(task, out)
        assert resolve_resume_path(_cfg(tmp_path, out)) == str(want)


def test_a_job_without_an_earlier_run_starts_afresh(tmp_path, in_multirun_job):
    _job_dir(tmp_path, "2026-01-01", 0, ["model.margin=0.1"], mtime=1_000_000_000)
    out = tmp_path / "train" / "multiruns" / "2026-01-02" / "1"
    in_multirun_job(["model.margin=0.3", "ckpt_path=last"], out)
    assert resolve_resume_path(_cfg(tmp_path, out)) is None


def test_a_single_run_still_takes_the_newest(tmp_path):
    _job_dir(tmp_path, "2026-01-01", 0, ["model.margin=0.1"], mtime=1_000_000_000)
    newest = _job_dir(tmp_path, "2026-01-01", 1, ["model.margin=0.2"], mtime=2_000_000_000)
    out = tmp_path / "train" / "runs" / "now"
    assert resolve_resume_path(_cfg(tmp_path, out)) == str(newest)


def test_ddp_ranks_resume_the_file_rank0_resolved(tmp_path, in_multirun_job):
    """The other ranks run as single runs: they get rank 0's resolved file, not ``last``."""
    job0 = _job_dir(tmp_path, "2026-01-01", 0, ["model.margin=0.1"], mtime=1_000_000_000)
    _job_dir(tmp_path, "2026-01-01", 1, ["model.margin=0.2"], mtime=2_000_000_000)
    out = tmp_path / "train" / "multiruns" / "2026-01-02" / "0"
    in_multirun_job(["model.margin=0.1", "ckpt_path=last"], out)
    set_resume_path(resolve_resume_path(_cfg(tmp_path, out)))
    command, _ = hydra_job_command(1)
    assert f'ckpt_path="{job0}"' in command and "ckpt_path=last" not in command
