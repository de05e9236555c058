"""``itm-prepare convert``: an authors' checkpoint rewritten as a regular itm checkpoint.

    itm-prepare convert runs/f30k_scan_t2i_lse/model_best.pth.tar --out scan_t2i_lse.ckpt

The output is a Lightning checkpoint as itm's training writes them: the converted weights under
``state_dict``, the resolved model config under ``hyper_parameters.cfg``, zip format, loadable
with ``weights_only=True`` (no pickled class). ``eval.py ckpt_path=<out>`` evaluates it like any
itm run, and ``train.py <overrides> ckpt_path=<out>`` fine-tunes from it: the overrides (printed,
and stored in the file under ``itm_released``) rebuild the same model config, which the resume
check requires. The authors' files hold no optimiser state, so the fine-tuning run starts at
epoch 0 with a fresh optimiser and learning-rate schedule; the authors' epoch and best rsum are
kept for the record under ``itm_released``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from itm.io import atomic_write
from itm.released import Released, load_released

__all__ = ["RELEASED_KEY", "convert_file", "itm_checkpoint"]

#: where a converted checkpoint keeps the account of its conversion (plain values only)
RELEASED_KEY = "itm_released"


def itm_checkpoint(released: Released) -> dict[str, Any]:
    """The Lightning checkpoint dict of a converted model (weights checked by a strict load)."""
    import lightning

    model = released.build_model()
    return {
        "state_dict": model.state_dict(),
        "hyper_parameters": {"cfg": released.model_cfg},
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        # nothing to restore: a fine-tuning run starts with a fresh optimiser and schedule
        "optimizer_states": [],
        "lr_schedulers": [],
        RELEASED_KEY: {
            "source": released.path,
            "format": released.format,
            "repository": released.repository,
            "variant": released.variant,
            "overrides": list(released.overrides),
            "mapped": dict(released.mapped),
            "unmapped": dict(released.unmapped),
            "dropped": dict(released.dropped),
            "epoch": released.epoch,
            "best_rsum": released.best_rsum,
        },
    }


def convert_file(source: str | Path, out: str | Path, force: bool = False) -> Released:
    """Convert the authors' checkpoint ``source`` into the itm checkpoint ``out`` (atomic write).

    Raises:
        FileExistsError: ``out`` exists and ``force`` is false.
        CheckpointError: ``source`` is unreadable, refused, of an unknown kind, or already an
            itm checkpoint.
    """
    from itm.checkpoint import CheckpointError

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (pass --force to overwrite)")
    released = load_released(source)
    if released is None:
        raise CheckpointError(f"{source} is already an itm (Lightning) checkpoint")
    checkpoint = itm_checkpoint(released)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as fh:
        torch.save(checkpoint, fh)
    return released


def main(args: Any) -> int:
    """The ``convert`` sub-command of ``itm-prepare``."""
    released = convert_file(args.checkpoint, args.out, force=args.force)
    print(released.summary())
    overrides = " ".join(released.overrides)
    print(f"\nwrote {args.out}: an itm checkpoint of {released.variant}")
    print(f"  evaluate:  python eval.py ckpt_path={args.out} data=precomp data.root=DATA")
    print(
        f"  fine-tune: python train.py {overrides} ckpt_path={args.out} data=precomp data.root=DATA"
    )
    print("  (fine-tuning starts at epoch 0 with a fresh optimiser: the authors' file has none)")
    return 0
