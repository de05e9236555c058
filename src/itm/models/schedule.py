"""Learning-rate schedules of the recipes that torch has no one-argument spelling for.

SCAN, BFAN, IMRAM, PFAN, VSRN and SAEM decay the lr x``gamma`` every ``lr_update`` epochs
(``torch.optim.lr_scheduler.StepLR(step_size=lr_update)``, the default of ``conf/train.yaml``).
CHAN and VSE-infinity decay it ONCE, at epoch ``lr_update`` (their ``adjust_learning_rate``:
``lr = base * 0.1 if epoch >= lr_update``): :func:`decay_once`. A ``StepLR`` there decays
again at ``2 x lr_update`` when a run is longer than the recipe's 25 epochs.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import MultiStepLR

__all__ = ["decay_once"]


def decay_once(optimizer: torch.optim.Optimizer, step_size: int, gamma: float = 0.1) -> MultiStepLR:
    """The lr x ``gamma`` from epoch ``step_size`` on, never again (an epoch-interval
    scheduler: ``step()`` once per epoch). ``step_size`` keeps the name of the default
    ``StepLR``'s argument, so that a recipe swaps only the ``_target_``."""
    if int(step_size) < 1:
        raise ValueError(f"model.scheduler.step_size must be >= 1 (an epoch), got {step_size}")
    return MultiStepLR(optimizer, milestones=[int(step_size)], gamma=float(gamma))
