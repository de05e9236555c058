"""Checkpoints: atomic writes, exact resume (RNG state), ``ckpt_path=last``, config checks.

- :class:`AtomicCheckpointIO`: the Trainer's checkpoint plugin (``trainer.plugins`` in
  ``conf/trainer/default.yaml``). A checkpoint is written to a hidden temporary file next to its
  final name, fsync-ed and renamed (:mod:`itm.io`), so a run killed at any moment leaves either
  the previous complete ``last.ckpt`` / ``best.ckpt`` or the new one, never a truncated file.
  Loading is ``weights_only=True`` only, through the one reader :func:`read_checkpoint_file`
  (itm checkpoints hold only tensors and plain Python values: the model config travels as a
  plain dict / YAML); a file that is not an itm checkpoint gets a one-line error naming it and
  ``itm-prepare convert``. ``best.ckpt`` and ``last.ckpt`` come
  from two stock ``ModelCheckpoint`` callbacks (``conf/callbacks/default.yaml``).
- RNG state: :func:`collect_rng_state` / :func:`restore_rng_state` store the torch (CPU and
  CUDA), numpy and Python generators in the checkpoint (``ITMModule.on_save_checkpoint``) and
  put them back when ``trainer.fit(ckpt_path=...)`` restores it. Lightning restores the model,
  optimizer, lr schedule, epoch and ModelCheckpoint state; with the generators restored too,
  the training DataLoader (which draws its shuffle seed from torch's global generator when each
  epoch's iterator is created) replays the same data order, so a resumed run continues exactly
  like an uninterrupted one (bit-for-bit on CPU with a fixed thread count).
- :func:`resolve_ckpt_path`: ``ckpt_path=last`` means the most recently written ``last.ckpt``
  under ``<paths.log_dir>/<task_name>/`` (``runs/*/checkpoints/`` and
  ``multiruns/*/*/checkpoints/``); inside a Hydra multirun, the newest of the runs with the
  job's own overrides (each job of a re-launched sweep resumes its own run; a job with no
  earlier run starts afresh); any other value is a path.
- :func:`check_model_config`: a checkpoint whose model config differs from the run's in its
  architecture is refused with the differing keys.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from itm.io import atomic_write, remove_stale_temps

log = logging.getLogger(__name__)

__all__ = [
    "RNG_KEY",
    "AtomicCheckpointIO",
    "CheckpointError",
    "check_model_config",
    "collect_rng_state",
    "config_differences",
    "find_last_checkpoint",
    "is_itm_checkpoint",
    "load_checkpoint_file",
    "read_checkpoint_file",
    "require_itm_checkpoint",
    "resolve_ckpt_path",
    "restore_rng_state",
]

#: key of the RNG state in a checkpoint dict
RNG_KEY = "itm_rng_state"

#: model config nodes that define the architecture (a difference makes a checkpoint unusable)
ARCH_KEYS = ("embed_size", "image_encoder", "text_encoder", "align", "pooling", "aux")
#: which keys inside those nodes change training only (a difference warns) is not listed here: a
#: node's ``_target_`` class declares them (``training_only_options``, :mod:`itm.models.schema`)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, not an itm run, another architecture)."""


# --- atomic checkpoint IO ------------------------------------------------------------------------


def _is_local(path: Any) -> bool:
    return "://" not in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes through a temporary file + fsync + ``os.replace`` and
    loads with ``weights_only=True`` unless told otherwise.

    ``Trainer(plugins=[AtomicCheckpointIO()])`` (``trainer.plugins`` of the trainer configs).
    Remote (fsspec URL) paths fall back to Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(Path(path)) as fh:
            torch.save(checkpoint, fh)

    def load_checkpoint(
        self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only=None
    ) -> dict[str, Any]:
        """Resume's read: :func:`load_checkpoint_file` (``weights_only=True``, an itm
        checkpoint or a one-line error naming the file); remote paths go to Lightning's."""
        if weights_only is False:
            raise CheckpointError(
                f"checkpoint {path}: itm loads checkpoints only with weights_only=True"
            )
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path, map_location=map_location, mmap=False)


# --- RNG state -----------------------------------------------------------------------------------


def collect_rng_state() -> dict[str, Any]:
    """The global generators' state as tensors and plain Python values (``weights_only``-safe):
    ``torch`` (ByteTensor), ``torch_cuda`` (list of ByteTensors, when CUDA is initialised),
    ``numpy`` (dict: keys as int64 tensor, pos, has_gauss, cached_gaussian), ``python``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [int(version), [int(x) for x in py_state], gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the generators saved by :func:`collect_rng_state`."""
    torch.set_rng_state(state["torch"].cpu() if torch.is_tensor(state["torch"]) else state["torch"])
    cuda = state.get("torch_cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"checkpoint holds {len(cuda)} CUDA generator states, this process sees "
                f"{torch.cuda.device_count()} devices: CUDA generators not restored",
                stacklevel=2,
            )
    npy = state.get("numpy")
    if npy is not None:
        keys = npy["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state(
            (
                npy["name"],
                keys,
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            )
        )
    py = state.get("python")
    if py is not None:
        version, py_state, gauss = py
        random.setstate((int(version), tuple(int(x) for x in py_state), gauss))


# --- reading checkpoints, config checks ----------------------------------------------------------


#: the only Python class a checkpoint may name besides torch's tensors and containers: the
#: authors' files carry their ``opt`` as an ``argparse.Namespace`` (recognised, then converted)
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+)")

#: how a foreign checkpoint becomes an itm one (named in every "not an itm checkpoint" error)
CONVERT_HINT = (
    "an authors' checkpoint (SCAN, BFAN, IMRAM, CHAN, VSE-infinity, SGRAF) is converted by "
    "`itm-prepare convert FILE --out FILE.ckpt`"
)


def read_checkpoint_file(
    path: str | Path, map_location: Any = "cpu", mmap: bool | None = None
) -> Any:
    """THE reader of every checkpoint file (eval, resume, notebooks, ``itm-prepare convert``):
    ``torch.load(path, weights_only=True)`` with :data:`SAFE_GLOBALS` allowed, nothing more --
    there is no ``weights_only=False`` fallback anywhere.

    Reads itm's zip-format checkpoints (memory-mapped) and the authors' legacy pickles. A
    pickle that names any other global (a class, or a function such as ``os.system``) is
    refused by torch's restricted unpickler before anything of it is built or run. ``mmap``:
    memory-map the tensors (default: for a zip-format file).

    Raises:
        CheckpointError: one line naming the file: missing, empty, unreadable, or refused (the
            global it names is quoted).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated or never written")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(
                path,
                map_location=map_location,
                weights_only=True,
                mmap=zipfile.is_zipfile(path) if mmap is None else mmap,
            )
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED.search(str(err))
        what = f"the global {found.group(1)}" if found else str(err).splitlines()[0]
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds pickled Python objects that weights_only "
            f"loading does not build ({what}); nothing of it was run. itm reads checkpoints with "
            "weights_only=True and allows only tensors, plain values and argparse.Namespace "
            f"(the authors' opt); {CONVERT_HINT}"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a damaged file
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or not a torch file?): "
            f"{type(err).__name__}: {text}"
        ) from None


def is_itm_checkpoint(obj: Any) -> bool:
    """An itm checkpoint: a Lightning dict with ``state_dict`` and ``hyper_parameters.cfg``."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        return False
    hparams = obj.get("hyper_parameters")
    return isinstance(hparams, Mapping) and isinstance(hparams.get("cfg"), Mapping)


def require_itm_checkpoint(obj: Any, path: str | Path) -> dict[str, Any]:
    """``obj`` (read from ``path``) when it is an itm checkpoint, else a one-line
    :class:`CheckpointError` naming the file, what it holds, and ``itm-prepare convert``."""
    if is_itm_checkpoint(obj):
        return obj
    if not isinstance(obj, Mapping):
        what = f"not a Lightning checkpoint: a {type(obj).__name__}, not a dict"
    elif "state_dict" not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:6]) + (", ..." if len(obj) > 6 else "")
        what = f"not a Lightning checkpoint: a dict with keys [{keys}] and no state_dict"
    else:
        what = "a Lightning checkpoint that holds no itm model config (hyper_parameters.cfg)"
    raise CheckpointError(f"checkpoint {path} is not an itm checkpoint ({what}); {CONVERT_HINT}")


def load_checkpoint_file(
    path: str | Path, map_location: Any = "cpu", mmap: bool | None = None
) -> dict[str, Any]:
    """An itm checkpoint read by :func:`read_checkpoint_file` and checked by
    :func:`require_itm_checkpoint` (resume; ``eval.py`` and the notebooks go through
    :func:`itm.evaluate.load_checkpoint`, which also converts the authors' files)."""
    return require_itm_checkpoint(read_checkpoint_file(path, map_location, mmap), path)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


_MISSING = "<absent>"


def _same_value(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if key.rsplit(".", 1)[-1] == "_target_" and isinstance(a, str) and isinstance(b, str):
        from itm.models.schema import resolve_target

        # two spellings of one class (module path vs a package re-export) are the same target
        found = resolve_target(a)
        return found is not None and found is resolve_target(b)
    return False


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: tuple[str, ...] = ARCH_KEYS
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, checkpoint value, this run's value)`` for every differing leaf of the
    ``keys`` nodes of two model configs. A key absent from one config and null in the other is
    no difference (options added later default to null, e.g. ``aux``); ``_target_`` strings
    are compared as the classes they import."""
    diffs = []
    for top in keys:
        a = _flatten(saved.get(top, _MISSING), top)
        b = _flatten(current.get(top, _MISSING), top)
        for k in sorted(set(a) | set(b)):
            va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
            if va in (None, _MISSING) and vb in (None, _MISSING):
                continue
            if not _same_value(k, va, vb):
                diffs.append((k, va, vb))
    return diffs


def _node(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def is_training_only(key: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether the dotted model-config ``key`` (e.g. ``image_encoder.region_drop``) is an
    option that changes training only: the node holding it has the same ``_target_`` class
    in both configs and that class declares the option in ``training_only_options``."""
    from itm.models.schema import resolve_target, training_only_options

    if "." not in key:
        return False
    parent, leaf = key.rsplit(".", 1)
    nodes = [_node(saved, parent), _node(current, parent)]
    if not all(isinstance(n, Mapping) and isinstance(n.get("_target_"), str) for n in nodes):
        return False
    classes = [resolve_target(n["_target_"]) for n in nodes]
    if classes[0] is None or classes[0] is not classes[1] or not isinstance(classes[0], type):
        return False
    return leaf in training_only_options(classes[0])


def check_model_config(
    saved: Mapping[str, Any], current: Mapping[str, Any], source: str = "checkpoint"
) -> None:
    """Raise :class:`CheckpointError` naming every architecture key where the checkpoint's
    model config differs from this run's; warn for training-only options (those the node's
    class declares in ``training_only_options``: augmentation, lr multipliers, dropout, a
    moved BERT / GloVe path)."""
    diffs = config_differences(saved, current)
    soft = [d for d in diffs if is_training_only(d[0], saved, current)]
    hard = [d for d in diffs if d not in soft]
    for k, a, b in soft:
        warnings.warn(f"{source}: model.{k} was {a!r}, this run uses {b!r}", stacklevel=2)
    if hard:
        lines = "\n".join(f"  model.{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in hard)
        raise CheckpointError(
            f"{source} was written by a model of another architecture; its config differs in:\n"
            f"{lines}\nresume with the checkpoint's model options (its run's .hydra/config.yaml), "
            "or start a new run without ckpt_path"
        )


# --- ckpt_path=last --------------------------------------------------------------------------------


def job_identity(overrides: Any) -> frozenset[str]:
    """A job's command-line overrides as a set, ``ckpt_path`` and ``hydra.*`` left out (they
    say how a job runs, not which job it is): ``["lr=1", "ckpt_path=last"]`` -> ``{"lr=1"}``."""
    out = set()
    for item in overrides or ():
        text = str(item).strip()
        key = text.split("=", 1)[0].lstrip("+~")
        if key == "ckpt_path" or key.startswith("hydra."):
            continue
        out.add(text)
    return frozenset(out)


def run_overrides(run_dir: str | Path) -> frozenset[str] | None:
    """:func:`job_identity` of the run in ``run_dir`` (its ``.hydra/overrides.yaml``), or
    ``None`` when the run folder has none."""
    import yaml

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return None
    return job_identity(items) if isinstance(items, list) else None


def multirun_job_overrides() -> list[str] | None:
    """The task overrides of the current Hydra multirun job, or ``None`` outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    return [str(o) for o in (hc.overrides.task or [])]


def find_last_checkpoint(
    root: str | Path, exclude: str | Path | None = None, job: Any = None
) -> Path | None:
    """The most recently modified ``last.ckpt`` under ``root`` (``runs/*/checkpoints`` and
    ``multiruns/*/*/checkpoints``; any depth as a fallback), ``exclude``'s subtree skipped.

    ``job``: the overrides of a multirun job; only runs with the same overrides (see
    :func:`job_identity`; ``.hydra/overrides.yaml`` of the run folder) are candidates, so each
    job of a re-launched sweep finds its own earlier run, not the newest of the sweep."""
    root = Path(root)
    if not root.is_dir():
        return None
    skip = Path(exclude).resolve() if exclude else None
    wanted = job_identity(job) if job is not None else None
    found = [
        p
        for p in root.glob("**/checkpoints/last.ckpt")
        if p.is_file()
        and not (skip and skip in p.resolve().parents)
        and (wanted is None or run_overrides(p.parent.parent) == wanted)
    ]
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))


def resolve_ckpt_path(
    ckpt_path: Any, log_root: str | Path, exclude: str | Path | None = None, job: Any = None
):
    """``None`` -> ``None``; ``"last"`` -> :func:`find_last_checkpoint` under ``log_root``; a
    path -> itself, checked to exist. Raises :class:`CheckpointError` with the place searched.

    With ``job`` (a multirun job's overrides) ``last`` is that job's own earlier run; a job
    that has none (a sweep point the killed sweep never reached) starts afresh (``None``)."""
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == "last":
        found = find_last_checkpoint(log_root, exclude, job)
        if found is None and job is not None:
            log.warning(
                "ckpt_path=last: no earlier run of this multirun job (overrides %s) under %s "
                "has a checkpoints/last.ckpt: starting afresh",
                sorted(job_identity(job)),
                log_root,
            )
            return None
        if found is None:
            raise CheckpointError(
                f"ckpt_path=last: no run under {log_root} has a checkpoints/last.ckpt "
                "(pass ckpt_path=<run dir>/checkpoints/last.ckpt, or check paths.log_dir / "
                "ITM_LOG_DIR and task_name)"
            )
        log.info("ckpt_path=last -> %s", found)
        return str(found)
    path = Path(str(ckpt_path)).expanduser()
    if not path.exists():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such file")
    if path.is_dir():
        last = (
            path / "checkpoints" / "last.ckpt"
            if (path / "checkpoints").is_dir()
            else path / "last.ckpt"
        )
        if last.is_file():
            return str(last)
        raise CheckpointError(f"ckpt_path={ckpt_path} is a directory without a last.ckpt")
    return str(path)


def prepare_resume(ckpt_path: str, model_cfg: Mapping[str, Any], callbacks: list) -> dict:
    """Checks before ``trainer.fit(ckpt_path=...)``; returns the loaded checkpoint.

    The checkpoint must load with ``weights_only=True`` and hold an itm model config of the
    same architecture. A ``ModelCheckpoint`` whose saved directory is the directory the
    checkpoint lies in (the checkpoint was not moved) continues writing there, so its best
    score, best / last paths are restored in full and ``last.ckpt`` / ``best.ckpt`` of the run
    stay the single up-to-date pair across any number of interruptions. Stale temporary files
    of a killed writer are removed from that directory.
    """
    ckpt = load_checkpoint_file(ckpt_path)
    check_model_config(ckpt["hyper_parameters"]["cfg"], model_cfg, source=f"checkpoint {ckpt_path}")
    here = Path(ckpt_path).resolve().parent
    states = ckpt.get("callbacks") or {}
    for cb in callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        saved = states.get(cb.state_key) or {}
        saved_dir = saved.get("dirpath")
        if saved_dir and Path(saved_dir).resolve() == here:
            cb.dirpath = saved_dir
            removed = remove_stale_temps(here)
            if removed:
                log.info("removed %d stale temporary file(s) in %s", len(removed), here)
    return ckpt


def rng_state_from(checkpoint: Mapping[str, Any]) -> Mapping[str, Any] | None:
    state = checkpoint.get(RNG_KEY)
    return state if isinstance(state, Mapping) else None


# --- the training entry point's helpers ----------------------------------------------------------


def resolve_resume_path(cfg: Any, job: Any = None) -> str | None:
    """``cfg.ckpt_path`` resolved (:func:`resolve_ckpt_path`): ``last`` is searched under
    ``<paths.log_dir>/<task_name>``, this run's own output directory excluded; inside a Hydra
    multirun (or with ``job``, a job's overrides) among the runs of the same job only."""
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        return None
    paths = cfg.get("paths") or {}
    log_dir = paths.get("log_dir", "outputs") if hasattr(paths, "get") else "outputs"
    root = Path(str(log_dir)) / str(cfg.get("task_name") or "train")
    try:
        exclude = paths.get("output_dir")
    except Exception:  # noqa: BLE001 - ${hydra:...} outside a Hydra app
        exclude = None
    if job is None:
        job = multirun_job_overrides()
    return resolve_ckpt_path(ckpt, root, exclude, job)
