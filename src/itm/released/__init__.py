"""The authors' own checkpoints: recognise, convert, evaluate.

Researchers hold checkpoints written by the authors' training code of SCAN, BFAN, IMRAM, CHAN,
VSE-infinity and SGRAF: ``torch.save`` dicts ``{'model': ..., 'opt': argparse.Namespace, 'epoch',
'best_rsum', ...}`` in torch's legacy pickle format. This package reads them safely
(:func:`~itm.checkpoint.read_checkpoint_file`, the one checkpoint reader: ``weights_only=True`` with ``argparse.Namespace`` as
the one extra allowed class), recognises the repository by the file's structure and options, and
builds the equivalent itm model (config from the project's own recipes and the checkpoint's
options, weights renamed onto itm's modules): one small file per repository.

    from itm.released import load_released
    released = load_released("model_best.pth.tar")   # None for an itm checkpoint
    model = released.build_model()                   # an ITMModule, weights loaded

``eval.py ckpt_path=<authors' file>`` goes through :func:`load_released`;
``itm-prepare convert`` writes the result as a regular itm checkpoint
(:mod:`itm.released.convert`). docs/released.md describes each format.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from itm.checkpoint import CheckpointError, is_itm_checkpoint, require_itm_checkpoint
from itm.released import bfan, chan, imram, scan, sgraf, vse_infty
from itm.released.base import Released, describe, read_checkpoint

__all__ = [
    "FORMATS",
    "Released",
    "convert_released",
    "identify",
    "is_itm_checkpoint",
    "load_released",
    "released_or_itm",
]

#: the recognised formats, each a module with ``FORMAT``, ``REPOSITORY``, ``matches``, ``convert``
FORMATS = (scan, bfan, imram, chan, vse_infty, sgraf)


def _opt_dict(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    opt = obj.get("opt")
    if isinstance(opt, argparse.Namespace):
        return vars(opt)
    return opt if isinstance(opt, Mapping) else {}


def identify(obj: Any, path: str | Path = "<checkpoint>"):
    """The format module of an authors' checkpoint ``obj``.

    Raises:
        CheckpointError: naming the file and what was found when no format fits.
    """
    if isinstance(obj, Mapping) and "model" in obj:
        opt = _opt_dict(obj)
        found = [fmt for fmt in FORMATS if fmt.matches(obj, opt)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:  # the formats' tests are exclusive; guard against a future overlap
            names = ", ".join(f.FORMAT for f in found)
            raise CheckpointError(f"checkpoint {path} fits several authors' formats ({names})")
    names = ", ".join(f"{f.FORMAT} ({f.REPOSITORY})" for f in FORMATS)
    raise CheckpointError(
        f"checkpoint {path} is of no kind itm reads: found {describe(obj)}. itm reads its own "
        "checkpoints (a Lightning dict with state_dict and hyper_parameters.cfg) and the "
        f"authors' files ({{'model': ..., 'opt': Namespace, ...}}) of {names}, which "
        "`itm-prepare convert FILE --out FILE.ckpt` rewrites as itm checkpoints"
    )


def convert_released(obj: Mapping[str, Any], path: str | Path) -> Released:
    """Convert a loaded authors' checkpoint (see :func:`identify`)."""
    return identify(obj, path).convert(obj, path)


def load_released(path: str | Path) -> Released | None:
    """The converted authors' checkpoint at ``path``, or ``None`` when it is an itm (Lightning)
    checkpoint, for the caller's own loader.

    Raises:
        CheckpointError: naming the file: unreadable, refused by safe loading (a pickle naming
            any class or function besides argparse.Namespace), of an unknown kind, or an
            authors' format with options itm cannot express.
    """
    found = released_or_itm(read_checkpoint(path), path)
    return found if isinstance(found, Released) else None


def released_or_itm(obj: Any, path: str | Path) -> Released | dict[str, Any]:
    """An already-read checkpoint ``obj`` as an itm checkpoint dict (returned as is) or a
    converted authors' one; anything else raises a one-line :class:`CheckpointError` naming the
    file, what it holds and ``itm-prepare convert``."""
    if isinstance(obj, Mapping) and "state_dict" in obj:
        return require_itm_checkpoint(obj, path)
    return convert_released(obj, path)
