"""Command-line entry points: ``itm-train`` / ``itm-eval`` (``python train.py`` / ``python eval.py``
in a checkout call the same functions).

Configs come from the installed package (Hydra's ``pkg://itm.conf``: the repository's ``conf/``,
shipped inside itm), so the commands work from any directory. A directory of your own configs
goes on top of them with Hydra's ``--config-dir DIR`` or ``$ITM_CONFIG_DIR``: its files are found
first, everything else comes from itm.

Errors the user can fix (bad data, an unusable checkpoint, a missing mandatory value, a config
option a target does not take, a missing optional extra) are printed as one line without a
traceback; ``HYDRA_FULL_ERROR=1`` shows the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from itm.errors import UserError, require_extra

__all__ = [
    "CONFIG_MODULE",
    "ConsoleFormatter",
    "check_extras",
    "config_dir",
    "eval_main",
    "normalize_argv",
    "objective",
    "reported_errors",
    "route_library_logs",
    "train_main",
]

#: the package holding the Hydra configs (``initialize_config_module(config_module=...)``)
CONFIG_MODULE = "itm.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"

# (override prefix, module the option needs, extra that installs it)
_EXTRA_OPTIONS = (
    ("hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("logger=tensorboard", "tensorboard", "tensorboard"),
)


def config_dir() -> str:
    """The directory of itm's own configs (the installed package ``itm.conf``; in an editable
    install the checkout's ``conf/``), for Hydra's compose API (``initialize_config_dir``).
    ``initialize_config_module(config_module=CONFIG_MODULE)`` reads the same files."""
    import importlib.resources

    return str(importlib.resources.files(CONFIG_MODULE))


class ConsoleFormatter(logging.Formatter):
    """Console lines of the Hydra apps: INFO records as their bare message (the epoch summary,
    the recall tables), anything else as ``LEVEL [logger] message``."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno == logging.INFO:
            return message
        return f"{record.levelname} [{record.name}] {message}"


def objective(metrics: dict[str, float], cfg: DictConfig) -> float | None:
    """The value a Hydra sweeper optimises (``cfg.optimized_metric``, default dev/best_rsum)."""
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept ``+experiment=NAME`` as well as ``experiment=NAME``.

    ``conf/train.yaml`` lists ``experiment: null`` in its defaults (so ``experiment=NAME`` works,
    as in the lightning-hydra-template); Hydra itself would reject the ``+`` spelling with
    "Multiple values for experiment". Both select the same recipe.
    """
    return [a[1:] if a.startswith("+experiment=") else a for a in argv]


def with_user_config_dir(argv: list[str]) -> list[str]:
    """``$ITM_CONFIG_DIR`` as Hydra's ``--config-dir`` (unless one is given on the command line)."""
    env = os.environ.get("ITM_CONFIG_DIR")
    given = any(a in ("--config-dir", "-cd") or a.startswith("--config-dir=") for a in argv)
    if not env or given:
        return argv
    return [argv[0], f"--config-dir={Path(env).expanduser().resolve()}", *argv[1:]]


def check_extras(overrides: Sequence[str]) -> None:
    """Raise :class:`~itm.errors.MissingExtraError` for an override that selects an optional part
    (Optuna, SLURM, TensorBoard) whose extra is not installed, before Hydra fails on it with a
    "could not find" message."""
    for arg in overrides:
        option = arg.lstrip("+~")
        for prefix, module, extra in _EXTRA_OPTIONS:
            if option.startswith(prefix):
                require_extra(module, extra, option.split(",")[0])


def _one_line(err: BaseException) -> str:
    """The message of ``err``, of the user error that caused it when Hydra wrapped it."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    cause = err
    while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip() or type(cause).__name__
    if isinstance(cause, MissingMandatoryValue):  # drop omegaconf's full_key / object_type lines
        key = getattr(cause, "full_key", "") or ""
        text = f"missing mandatory value {key}: set it, e.g. {key}=..." if key else text
    if cause is not err:  # say which config node failed to build
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if first.startswith("Error in call to target"):
            text = f"{first.removesuffix(':')}: {text}"
    return text


def _user_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    from itm.checkpoint import CheckpointError
    from itm.data.validation import DataError

    return (
        UserError,
        DataError,
        CheckpointError,
        MissingMandatoryValue,
        InstantiationException,
        FileNotFoundError,
    )


@contextmanager
def reported_errors(prog: str) -> Iterator[None]:
    """Print a user error as ``<prog>: error: <message>`` on stderr and exit with status 1 (no
    traceback); with ``HYDRA_FULL_ERROR=1`` let it propagate (Hydra prints the full traceback)."""
    try:
        yield
    except _user_errors() as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(
            f"{prog}: error: {_one_line(err)}\n(HYDRA_FULL_ERROR=1 shows the traceback)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1) from None


def route_library_logs() -> None:
    """Send Lightning's log records through the app's logging (Hydra's console and log file).

    ``import lightning`` gives its ``lightning`` logger a console handler of its own (stderr,
    ``INFO: ...``); records of ``lightning.pytorch`` would then print twice. Call after Lightning
    is imported."""
    lg = logging.getLogger("lightning")
    for handler in list(lg.handlers):
        if type(handler) is logging.StreamHandler:
            lg.removeHandler(handler)
    lg.propagate = True


def _train_task(cfg: DictConfig) -> float | None:
    from itm.train import train

    route_library_logs()
    with reported_errors("itm-train"):
        return objective(train(cfg), cfg)


def _eval_task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from itm.evaluate import evaluate, with_output_dir

    route_library_logs()
    with reported_errors("itm-eval"):
        metrics = evaluate(with_output_dir(cfg, HydraConfig.get().runtime.output_dir))
    return next((v for k, v in metrics.items() if k.endswith("/rsum")), None)


def _run(task: Callable[[DictConfig], Any], config_name: str, prog: str) -> None:
    sys.argv = with_user_config_dir(normalize_argv(sys.argv))
    with reported_errors(prog):
        check_extras(sys.argv[1:])
    hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)(task)()


def train_main() -> None:
    """``itm-train [overrides]``: train a model (``itm.train.train``), Hydra app of ``train``."""
    _run(_train_task, "train", "itm-train")


def eval_main() -> None:
    """``itm-eval ckpt_path=... [data=...] protocol=f30k``: evaluate checkpoints
    (``itm.evaluate.evaluate``), Hydra app of ``eval``."""
    _run(_eval_task, "eval", "itm-eval")
