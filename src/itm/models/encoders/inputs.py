"""Per-region inputs an encoder reads besides the features (PFAN's ``positions``).

An encoder that needs them names them in a class attribute ``extra_inputs`` and takes them as
keyword arguments; the training and evaluation scripts read the declaration from the config's
``_target_`` (before anything is built) to tell the datamodule what to serve.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["declared_inputs"]


def declared_inputs(node: Mapping[str, Any] | Any) -> tuple[str, ...]:
    """The per-region inputs (``extra_inputs``) an encoder declares, from its config node
    (``_target_``) or from an encoder object; ``()`` for encoders that read features only."""
    if isinstance(node, Mapping):  # a dict or an OmegaConf DictConfig
        target = node.get("_target_")
        if not target:
            return ()
        from hydra.utils import get_class

        return tuple(getattr(get_class(str(target)), "extra_inputs", ()))
    return tuple(getattr(node, "extra_inputs", ()))
