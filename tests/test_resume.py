"""Exact resume and atomic outputs: fault injection with SIGKILL.

The main test trains the same tiny model twice through the CLI: once uninterrupted for 3
epochs, once killed with SIGKILL in the middle of epoch 3 (at a fixed global step, from inside
the process: :mod:`fault_injection`) and then resumed with ``ckpt_path=last``. Both must end
with the same dev / test metrics and the same weights, and the killed run must leave no
partially written file under a final name.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from itm.io import is_temp_name

TESTS = Path(__file__).resolve().parent

# 48 images x 5 captions / 32 = 8 batches per epoch; the lr halves every epoch (the schedule
# must resume too) and word augmentation draws from the global generator (RNG must resume).
RUN = [
    "debug=fast",
    "model.embed_size=32",
    "model.text_encoder.word_dim=16",
    "model.text_encoder.word_aug=0.2",
    "data.n_train=48",
    "data.batch_size=32",
    "trainer.limit_train_batches=null",
    "trainer.max_epochs=3",
    "model.scheduler.step_size=1",
    "model.scheduler.gamma=0.5",
    "model.optimizer.lr=1e-3",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.alignment_images=null",
]
BATCHES_PER_EPOCH = 8
KILL_STEP = 2 * BATCHES_PER_EPOCH + 3  # batch 3 of the third epoch (epoch index 2)


def _start(args: list[str], log_dir: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "ITM_LOG_DIR": str(log_dir),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *RUN, *args],
        cwd=log_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: int = 420) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"training subprocess timed out:\n{out[-3000:]}")
    return proc.returncode, out


def _metrics(log_dir: Path) -> tuple[dict[int, float], dict[str, float]]:
    """Dev rsum per epoch and the final test figures, over every run of ``log_dir``."""
    dev: dict[int, float] = {}
    test: dict[str, float] = {}
    for path in sorted(log_dir.glob("train/runs/*/csv/metrics.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("dev/rsum"):
                    dev[int(row["epoch"])] = float(row["dev/rsum"])
                test.update({k: float(v) for k, v in row.items() if k.startswith("test/") and v})
    return dev, test


def _assert_no_partial_files(root: Path) -> None:
    """Every checkpoint under a final name loads completely; temporary names are hidden."""
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        if is_temp_name(path):
            assert path.name.startswith("."), path
            continue
        if path.suffix == ".ckpt":
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            assert "state_dict" in ckpt and "itm_rng_state" in ckpt, path


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    # three CLI runs (two side by side): ~18 s on an idle 2-core machine
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    # the uninterrupted run and the run to be killed, side by side
    full = _start([], full_dir)
    killed = _start(
        [
            "+callbacks.fault._target_=fault_injection.SigkillAt",
            f"+callbacks.fault.step={KILL_STEP}",
        ],
        killed_dir,
    )
    rc_killed, out_killed = _finish(killed)
    rc_full, out_full = _finish(full)
    assert rc_full == 0, out_full[-4000:]
    assert rc_killed == -signal.SIGKILL, f"expected SIGKILL, got {rc_killed}:\n{out_killed[-3000:]}"

    # what the kill left: last.ckpt of epoch 2 (index 1), complete; nothing partial
    (ckpt_dir,) = killed_dir.glob("train/runs/*/checkpoints")
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 2 * BATCHES_PER_EPOCH
    _assert_no_partial_files(killed_dir)

    # resume: ckpt_path=last finds that run's last.ckpt
    rc, out = _finish(_start(["ckpt_path=last"], killed_dir))
    assert rc == 0, out[-4000:]
    assert "Restored all states" in out, out[-3000:]
    _assert_no_partial_files(killed_dir)

    dev_full, test_full = _metrics(full_dir)
    dev_resumed, test_resumed = _metrics(killed_dir)
    assert sorted(dev_full) == sorted(dev_resumed) == [0, 1, 2]
    for epoch in dev_full:
        assert dev_resumed[epoch] == dev_full[epoch], (epoch, dev_full, dev_resumed)  # bit-for-bit
    assert test_full and set(test_full) == set(test_resumed)
    for k in test_full:
        assert test_resumed[k] == test_full[k], (k, test_full, test_resumed)

    # the same final weights and optimizer state; the resumed run kept writing the checkpoints
    # of the run it resumed (one last.ckpt / best.ckpt pair per run)
    (full_ckpt,) = full_dir.glob("train/runs/*/checkpoints/last.ckpt")
    a = torch.load(full_ckpt, map_location="cpu", weights_only=True)
    b = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    for name, tensor in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], tensor), name
    assert a["lr_schedulers"][0]["_last_lr"] == b["lr_schedulers"][0]["_last_lr"]
    runs = sorted(p.name for p in killed_dir.glob("train/runs/*"))
    assert len(runs) == 2 and not list((killed_dir / "train/runs" / runs[1]).glob("checkpoints/*"))


def _cfg(compose, out: Path, overrides: list[str]):
    from omegaconf import open_dict

    cfg = compose([*RUN, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(out.parents[2])  # <log_dir>/train/runs/<run>
    return cfg


def test_resume_in_process_matches_uninterrupted(compose, tmp_path):
    """Fast variant (no subprocess): a run stopped after epoch 1 and resumed with
    ``ckpt_path=last`` for epoch 2 ends exactly like a 2-epoch run: same data order, random
    augmentation, lr schedule, weights, optimizer state, dev and test metrics."""
    from itm.train import train

    full = train(_cfg(compose, tmp_path / "train" / "runs" / "full", ["trainer.max_epochs=2"]))
    part_dir = tmp_path / "train" / "runs" / "part"
    train(_cfg(compose, part_dir, ["trainer.max_epochs=1", "test=false"]))
    resumed_dir = tmp_path / "train" / "runs" / "resumed"
    resumed = train(_cfg(compose, resumed_dir, ["trainer.max_epochs=2", "ckpt_path=last"]))
    assert set(full) == set(resumed) and "test/rsum" in full
    for k, v in full.items():
        assert resumed[k] == v, (k, full, resumed)  # bit-for-bit, as the README says
    a = torch.load(tmp_path / "train/runs/full/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(part_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for name, tensor in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], tensor), name
    for sa, sb in zip(
        a["optimizer_states"][0]["state"].values(),
        b["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert torch.equal(sb["exp_avg"], sa["exp_avg"])
    # the resumed run wrote its checkpoints next to the ones it resumed from
    assert not (resumed_dir / "checkpoints").exists()


@pytest.mark.slow
def test_resume_without_rng_state_would_differ(compose, tmp_path):
    """The test above can fail: resuming with the generators NOT restored changes the data
    order and the augmentation, hence the weights."""
    from itm import checkpoint
    from itm.train import train

    part = tmp_path / "train" / "runs" / "part"
    train(_cfg(compose, part, ["trainer.max_epochs=2", "test=false"]))
    ckpt = part / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    train(_cfg(compose, tmp_path / "train/runs/a", [f"ckpt_path={ckpt}", "test=false"]))
    with_rng = torch.load(ckpt, weights_only=True)["state_dict"]
    torch.save(saved, ckpt)  # back to the epoch-2 checkpoint
    orig = checkpoint.restore_rng_state
    try:
        checkpoint.restore_rng_state = lambda state: None
        train(_cfg(compose, tmp_path / "train/runs/b", [f"ckpt_path={ckpt}", "test=false"]))
    finally:
        checkpoint.restore_rng_state = orig
    without = torch.load(ckpt, weights_only=True)["state_dict"]
    diff = max((with_rng[k] - without[k]).abs().max().item() for k in with_rng)
    assert diff > 1e-4


WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import itm.io

    target, kind = Path(sys.argv[1]), sys.argv[2]
    if kind == "file":
        # SIGKILL half-way through writing the new content
        with itm.io.atomic_write(target) as fh:
            fh.write(b"N" * 500_000)
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    else:
        # SIGKILL after the new checkpoint is fully written, right before the rename
        import torch
        from itm.checkpoint import AtomicCheckpointIO

        itm.io.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(100_000)}}, target)
    """
)


@pytest.mark.parametrize("kind", ["file", pytest.param("checkpoint", marks=pytest.mark.slow)])
def test_sigkill_while_writing_keeps_the_old_file(tmp_path, kind):
    from itm.io import remove_stale_temps

    target = tmp_path / ("out.bin" if kind == "file" else "last.ckpt")
    if kind == "file":
        target.write_bytes(b"old complete content")
        old = target.read_bytes()
    else:
        torch.save({"state_dict": {"w": torch.zeros(3)}}, target)
        old = target.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(target), kind],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert target.read_bytes() == old  # the final name still holds the old, complete file
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert leftovers and all(is_temp_name(p) and p.name.startswith(".") for p in leftovers)
    assert remove_stale_temps(tmp_path) == leftovers  # the writer is dead: cleared
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
