"""DDP under Hydra: one output directory per job, also in multiruns (docs/distributed.md).

Lightning's ``strategy=ddp`` starts ranks ``1..N-1`` by re-running the script with the
ORIGINAL command line (``sys.argv``) plus ``hydra.run.dir=...``. Inside a Hydra multirun that
command still holds ``-m`` and the whole sweep, so rank 1 re-runs the sweep into a second,
timestamped sweep directory and keeps its processes alive across jobs.

:func:`install_hydra_ddp_launcher` replaces that command with the CURRENT JOB only: the script,
Hydra's config flags of the parent (``--config-path`` / ``--config-name`` / ``--config-dir``),
the job's own overrides (``hydra.overrides.task``, sweep values included; ``ckpt_path`` set to
the file rank 0 resolved, :func:`set_resume_path`), ``hydra.mode=RUN``,
``hydra.run.dir=<the job's output dir>`` and ``hydra.output_subdir=null``. Every rank of a job
then works in the job's directory and no second sweep directory appears.
:func:`release_job_processes` ends a job cleanly in the process that launched the other ranks
(waits for them, destroys the process group and clears the launcher's environment variables),
so that the next job of the sweep launches fresh ranks on a fresh port.

Neither matters on SLURM (``hydra/launcher=slurm``) or under ``torchrun``: there the ranks are
started from outside and Lightning launches nothing (:func:`needs_hydra_ddp_launcher`).

The one private hook: Lightning has no public way to change the command its subprocess launcher
runs, so :func:`install_hydra_ddp_launcher` replaces the module function
``_hydra_subprocess_cmd(local_rank) -> (command, cwd)`` of Lightning's subprocess launchers. It
checks that the function exists with that signature and raises naming the Lightning version
when it does not (the dependency is pinned below the next minor release for that reason).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "hydra_job_command",
    "install_hydra_ddp_launcher",
    "needs_hydra_ddp_launcher",
    "release_job_processes",
    "set_resume_path",
]

_LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Hydra overrides of the parent that still make sense for a single-run child.
_KEEP_HYDRA = ("hydra.job.chdir", "hydra.job.env_set", "hydra.verbose", "hydra/job_logging")
_PATCHED = "_hydra_subprocess_cmd"
# the checkpoint the current job resumes, as resolved by rank 0 (``ckpt_path=last`` resolved once)
_RESUME: dict[str, str | None] = {}


def set_resume_path(path: str | None) -> None:
    """Record the checkpoint this job resumes (``None``: none), so that the ranks started by
    :func:`hydra_job_command` resume the same file instead of resolving ``ckpt_path=last``
    again (in a multirun child, a single run, it would mean another run)."""
    _RESUME["ckpt_path"] = path


def _job_overrides(task: Sequence[Any]) -> list[str]:
    out = [str(o) for o in task]
    if "ckpt_path" not in _RESUME:
        return out
    path = _RESUME["ckpt_path"]
    out = [o for o in out if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    out.append(f"ckpt_path={_quote(path)}" if path else "ckpt_path=null")
    return out


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def hydra_config_flags(argv: Sequence[str]) -> list[str]:
    """Hydra's ``--config-path`` / ``--config-name`` / ``--config-dir`` flags of ``argv``
    (long or short spelling, ``=value`` or separate value), as ``--flag=value``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for long, short in (
        ("--config-path", "-cp"),
        ("--config-name", "-cn"),
        ("--config-dir", "-cd"),
    ):
        parser.add_argument(long, short)
    known, _ = parser.parse_known_args(list(argv))
    return [
        f"--{flag.replace('_', '-')}={value}"
        for flag, value in vars(known).items()
        if value is not None
    ]


def hydra_job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """The command that starts rank ``local_rank`` of the current Hydra job, and its cwd."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hc = HydraConfig.get()
    spec = getattr(__main__, "__spec__", None)
    if spec is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", spec.name]
    command += hydra_config_flags(sys.argv[1:])
    command += _job_overrides(hc.overrides.task)
    command += [str(o) for o in hc.overrides.hydra if str(o).lstrip("+~").startswith(_KEEP_HYDRA)]
    command += [
        "hydra.mode=RUN",
        f"hydra.run.dir={_quote(str(hc.runtime.output_dir))}",
        f"hydra.job.name={hc.job.name}_ddp_rank{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def needs_hydra_ddp_launcher(trainer: Any) -> bool:
    """Whether ``trainer`` will start its other ranks itself from inside a Hydra app (a
    multi-process strategy whose cluster environment does not create the processes)."""
    from hydra.core.hydra_config import HydraConfig

    env = getattr(trainer.strategy, "cluster_environment", None)
    return (
        HydraConfig.initialized()
        and trainer.world_size > 1
        and env is not None
        and not env.creates_processes_externally
    )


def install_hydra_ddp_launcher() -> None:
    """Make Lightning's subprocess launcher start the other ranks with :func:`hydra_job_command`
    (idempotent).

    Raises:
        RuntimeError: naming the Lightning version, when its launcher modules no longer have the
            replaced function ``_hydra_subprocess_cmd(local_rank)``.
    """
    import lightning
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as pl_launcher

    for module in (pl_launcher, fabric_launcher):
        current = getattr(module, _PATCHED, None)
        if current is hydra_job_command:
            continue
        if current is None or list(inspect.signature(current).parameters) != ["local_rank"]:
            raise RuntimeError(
                f"itm's DDP launch under Hydra replaces {module.__name__}.{_PATCHED}"
                f"(local_rank), which lightning {lightning.__version__} no longer has; install "
                "lightning<2.7 (itm's supported range), or start the ranks from outside "
                "(torchrun, SLURM: hydra/launcher=slurm)"
            )
        setattr(module, _PATCHED, hydra_job_command)


def release_job_processes(trainer: Any, failed: bool = False, timeout: float = 300.0) -> None:
    """End a DDP job in the process that launched the other ranks.

    After a successful job: waits for the launched ranks to exit, destroys the default process
    group and removes the launcher's environment variables, so that a following job in the same
    process (a multirun) starts its own ranks on a fresh port. After a failed job it does
    nothing (Lightning's child-process observer ends the other ranks). Does nothing in processes
    that launched no rank (single device, spawned ranks, SLURM).
    """
    import torch.distributed as dist

    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    procs = list(getattr(launcher, "procs", None) or [])
    if launcher is None or not procs or failed:
        return
    for proc in procs:
        proc.wait(timeout=timeout)
    launcher.procs = []
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key in _LAUNCHER_ENV:
        os.environ.pop(key, None)
