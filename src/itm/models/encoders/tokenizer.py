"""The caption tokenizer a text encoder reads its ids from.

A text encoder whose ids are not the data's word vocabulary (BERT's WordPiece) says so with a
class-level callable ``caption_tokenizer(config) -> tokenizer`` (a static or class method),
given its own config node; an encoder
without one (the BiGRU) reads the data's word vocabulary. The datamodule builder
(:func:`itm.data.build.build_datamodule`) asks the class named by ``_target_``, before anything
is built, so no key of the config (``path`` or other) is taken to mean "BERT".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["caption_tokenizer"]


def caption_tokenizer(node: Mapping[str, Any]) -> Any | None:
    """The tokenizer the text encoder of config ``node`` (its ``_target_`` class) declares, or
    ``None`` when it reads the data's word vocabulary (or ``node`` names no class).

    Raises:
        whatever the encoder's ``caption_tokenizer`` raises for a bad config (e.g. a
        ``FileNotFoundError`` naming a missing BERT directory).
    """
    target = node.get("_target_") if isinstance(node, Mapping) else None
    if not target:
        return None
    from hydra.utils import get_class

    make = getattr(get_class(str(target)), "caption_tokenizer", None)
    return make(node) if make is not None else None
