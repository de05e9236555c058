"""The one way a DataModule is built from the configuration (training, evaluation and the
notebooks all call :func:`build_datamodule`).

The data node is instantiated; the model's encoders then say what the data must serve: the text
encoder's caption tokenizer when it brings one (:func:`itm.models.encoders.caption_tokenizer`,
e.g. BERT's WordPiece; otherwise the data's word vocabulary) and the per-region inputs the image
encoder declares (:func:`itm.models.encoders.declared_inputs`, e.g. PFAN's ``positions``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["build_datamodule"]


def build_datamodule(
    data_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], **overrides: Any
) -> Any:
    """The DataModule of ``data_cfg`` (a Hydra node with ``_target_``) for the model of
    ``model_cfg`` (its ``text_encoder`` / ``image_encoder`` nodes).

    Args:
        data_cfg: the ``data`` node.
        model_cfg: the ``model`` node (of this run, or of a checkpoint's run).
        **overrides: keyword arguments passed to the DataModule over the node's values.
    """
    from hydra.utils import instantiate

    from itm.models.encoders import caption_tokenizer, declared_inputs

    dm = instantiate(data_cfg, _convert_="all", **overrides)
    tokenizer = caption_tokenizer(model_cfg.get("text_encoder") or {})
    if tokenizer is not None:
        dm.tokenizer = tokenizer
    if hasattr(dm, "image_inputs"):  # per-region inputs the image encoder reads (PFAN)
        dm.image_inputs = declared_inputs(model_cfg.get("image_encoder") or {})
    return dm
