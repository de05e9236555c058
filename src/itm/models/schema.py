"""Which constructor options of a model config node change training only, not the model.

A class built from a config node (its ``_target_``) declares the options that augment, weight a
loss, set a learning-rate multiplier or only initialise parameters that a checkpoint then
overwrites, as the class attribute ``training_only_options`` (a ``frozenset`` of parameter
names). A subclass inherits its bases' declarations. Resuming from a checkpoint whose config
differs from the run's in one of those options warns (:func:`itm.checkpoint.check_model_config`);
any other difference (a size, a head option, a normalisation) refuses the checkpoint.

The names are checked against the constructor signatures by the tests, so the declaration
cannot drift from the code the way a separate hand list of key names does.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

__all__ = ["TRAINING_ONLY_ATTR", "resolve_target", "training_only_options"]

#: the class attribute holding a node class's training-only option names
TRAINING_ONLY_ATTR = "training_only_options"


def training_only_options(cls: type) -> frozenset[str]:
    """The training-only option names of ``cls`` and its bases (empty when none declared)."""
    names: set[str] = set()
    for klass in inspect.getmro(cls):
        names |= set(vars(klass).get(TRAINING_ONLY_ATTR, ()))
    return frozenset(names)


@lru_cache(maxsize=256)
def resolve_target(target: str) -> Any:
    """The object a ``_target_`` string names (``a.b.C`` -> the class), or ``None`` when it
    cannot be imported. Two spellings of one class (a module path and a package re-export)
    resolve to the same object."""
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception:  # noqa: BLE001 - an unknown / moved target: compared as a string
        return None
