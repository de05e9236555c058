"""DDP under Hydra: one output directory per job, also in multiruns.

Lightning's ``strategy=ddp`` starts ranks ``1..N-1`` by re-running the script with the
ORIGINAL command line (``sys.argv``) plus ``hydra.run.dir=...``. Inside a Hydra multirun that
command still holds ``-m`` and the whole sweep, so rank 1 re-runs the sweep into a second,
timestamped sweep directory and keeps its processes alive across jobs (environment.md).

:func:`install_hydra_ddp_launcher` replaces that command with the CURRENT JOB only: the script,
the job's own overrides (``hydra.overrides.task``, sweep values included), ``hydra.mode=RUN``,
``hydra.run.dir=<the job's output dir>`` and ``hydra.output_subdir=null``. Every rank of a job
then works in the job's directory and no second sweep directory appears.
:func:`release_job_processes` ends a job cleanly in the process that launched the other ranks
(waits for them, destroys the process group and clears the launcher's environment variables),
so that the next job of the sweep launches fresh ranks on a fresh port.

Neither matters on SLURM (``hydra/launcher=slurm``): there srun starts every rank and Lightning
launches nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["hydra_job_command", "install_hydra_ddp_launcher", "release_job_processes"]

_LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Hydra overrides of the parent that still make sense for a single-run child.
_KEEP_HYDRA = ("hydra.job.chdir", "hydra.job.env_set", "hydra.verbose", "hydra/job_logging")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def hydra_job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command that starts rank ``local_rank`` of the current Hydra job, and its cwd."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    if getattr(__main__, "__spec__", None) is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += [str(o) for o in hc.overrides.task]
    command += [str(o) for o in hc.overrides.hydra if str(o).lstrip("+~").startswith(_KEEP_HYDRA)]
    command += [
        "hydra.mode=RUN",
        f"hydra.run.dir={_quote(str(hc.runtime.output_dir))}",
        f"hydra.job.name={hc.job.name}_ddp_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def install_hydra_ddp_launcher() -> None:
    """Make Lightning's subprocess launcher start the other ranks with :func:`hydra_job_command`
    (idempotent)."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as pl_launcher

    for module in (pl_launcher, fabric_launcher):
        if getattr(module, "_hydra_subprocess_cmd", None) is not hydra_job_command:
            module._hydra_subprocess_cmd = hydra_job_command


def release_job_processes(trainer: Any, failed: bool = False, timeout: float = 300.0) -> None:
    """End a DDP job in the process that launched the other ranks.

    After a successful job: waits for the launched ranks to exit, destroys the default process
    group and removes the launcher's environment variables, so that a following job in the same
    process (a multirun) starts its own ranks on a fresh port. After a failed job it does
    nothing (Lightning's child-process observer ends the other ranks). Does nothing in processes
    that launched no rank (single device, spawned ranks, SLURM).
    """
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    procs = list(getattr(launcher, "procs", None) or [])
    if not procs or failed:
        return
    for proc in procs:
        proc.wait(timeout=timeout)
    launcher.procs = []
    from lightning.fabric.utilities.distributed import _destroy_dist_connection

    _destroy_dist_connection()
    for key in _LAUNCHER_ENV:
        os.environ.pop(key, None)
