"""BFAN (Liu et al., ACM MM 2019; github CrossmodalGroup/BFAN): bidirectional focal attention.

``checkpoint['model']`` = ``[img_enc.state_dict(), txt_enc.state_dict()]`` as SCAN's (``fc``;
``embed``, ``rnn``, the GRU always bidirectional). The opt: ``focal_type`` (equal | prob),
``lambda_softmax``; both directions are summed, each a mean over its fragments, with
clipped_l2norm attention (fixed in the code).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from itm.released.base import (
    BOOKKEEPING,
    GRU_RENAME,
    Conversion,
    Released,
    fc_gru_sizes,
    map_encoders,
    map_training,
    model_list,
)
from itm.released.scan import fold_weight_norm, image_encoder_options

FORMAT, REPOSITORY = "BFAN", "CrossmodalGroup/BFAN"


def matches(ckpt: Mapping[str, Any], opt: Mapping[str, Any]) -> bool:
    return (
        isinstance(ckpt.get("model"), (list, tuple))
        and len(ckpt["model"]) == 2
        and "focal_type" in opt
    )


def convert(ckpt: Mapping[str, Any], path: str | Path) -> Released:
    conv = Conversion(ckpt, path, FORMAT, REPOSITORY)
    img, txt = model_list(conv, ckpt, 2)
    focal = conv.choose("focal_type", {"equal": "equal", "prob": "prob"})
    conv.set("experiment", f"bfan_{focal}", "focal_type")
    image_encoder_options(conv)
    conv.set("model.align.focal", focal, "focal_type")
    conv.map("lambda_softmax", "model.align.lambda_softmax", float)
    conv.set("model.align.direction", "both")
    map_encoders(conv, bidirectional=True)  # BFAN's EncoderText is always bidirectional
    map_training(conv)
    conv.weights(fold_weight_norm(img, conv), "model[0]", [("fc.", "image_encoder.fc.")])
    conv.weights(txt, "model[1]", [("embed.", "text_encoder.embed."), GRU_RENAME])
    return conv.finish(f"BFAN {focal}", BOOKKEEPING, fc_gru_sizes(conv.state_dict))
