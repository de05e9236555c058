"""SCAN (Lee et al., ECCV 2018; github kuanghuei/SCAN): stacked cross attention.

``checkpoint['model']`` = ``[img_enc.state_dict(), txt_enc.state_dict()]``: the image encoder's
``fc`` (or ``fc.weight_g`` / ``fc.weight_v`` with ``--precomp_enc_type=weight_norm``), the text
encoder's ``embed`` and ``rnn``. The opt names the head: ``cross_attn`` (t2i | i2t),
``agg_func`` (LogSumExp | Mean | Max | Sum), ``lambda_softmax``, ``lambda_lse``,
``raw_feature_norm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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

FORMAT, REPOSITORY = "SCAN", "kuanghuei/SCAN"

#: SCAN's agg_func -> itm pooling group
AGG_FUNC = {"LogSumExp": "lse", "Mean": "avg", "Max": "max", "Sum": "sum"}
#: raw_feature_norm values itm offers (SCAN's l1 variants fail in its own code)
FEATURE_NORMS = ("clipped_l2norm", "l2norm", "softmax", "clipped", "no_norm")


def matches(ckpt: Mapping[str, Any], opt: Mapping[str, Any]) -> bool:
    return (
        isinstance(ckpt.get("model"), (list, tuple))
        and len(ckpt["model"]) == 2
        and "cross_attn" in opt
        and "agg_func" in opt
        and "focal_type" not in opt
    )


def fold_weight_norm(img: Mapping[str, Tensor], conv: Conversion) -> dict[str, Tensor]:
    """``fc.weight_g`` / ``fc.weight_v`` of ``weight_norm(Linear, dim=None)`` (the authors') folded
    into one ``fc.weight = g * v / ||v||_F``, the same Linear at evaluation (a per-row ``g``,
    weight_norm's ``dim=0``, divides each row by its own norm)."""
    img = dict(img)
    if "fc.weight_v" in img:
        g, v = img.pop("fc.weight_g"), img.pop("fc.weight_v")
        if g.numel() == 1:
            norm = torch.linalg.vector_norm(v)
        else:
            norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        img["fc.weight"] = (g.reshape(-1, 1) if g.numel() > 1 else g) * v / norm
        conv.dropped["model[0][fc.weight_g, fc.weight_v]"] = (
            "weight normalisation folded into fc.weight = g v / ||v|| (fine-tuning then trains "
            "the plain weight)"
        )
    return img


def image_encoder_options(conv: Conversion) -> None:
    """``precomp_enc_type``: basic (``fc``) or weight_norm (``fc`` folded)."""
    conv.choose("precomp_enc_type", {"basic": "fc", "weight_norm": "fc"}, default="basic")
    conv.set("model/image_encoder", "fc", "precomp_enc_type")


def convert(ckpt: Mapping[str, Any], path: str | Path) -> Released:
    conv = Conversion(ckpt, path, FORMAT, REPOSITORY)
    img, txt = model_list(conv, ckpt, 2)
    direction = conv.choose("cross_attn", {"t2i": "t2i", "i2t": "i2t"})
    pooling = conv.choose("agg_func", AGG_FUNC)
    conv.set("experiment", f"scan_{direction}_{'lse' if pooling == 'lse' else 'avg'}", "cross_attn")
    image_encoder_options(conv)
    conv.set("model.align.direction", direction, "cross_attn")
    conv.map("lambda_softmax", "model.align.lambda_softmax", float)
    norm = conv.choose("raw_feature_norm", {k: k for k in FEATURE_NORMS}, default="clipped_l2norm")
    conv.set("model.align.feature_norm", norm, "raw_feature_norm")
    conv.set("pooling", pooling, "agg_func")
    if pooling == "lse":
        conv.map("lambda_lse", "model.pooling.lambda_lse", float)
        conv.set("model.pooling.rescale", True, "agg_func")
    else:
        conv.note("lambda_lse", "read only with agg_func=LogSumExp")
    map_encoders(conv)
    map_training(conv)
    conv.weights(fold_weight_norm(img, conv), "model[0]", [("fc.", "image_encoder.fc.")])
    conv.weights(txt, "model[1]", [("embed.", "text_encoder.embed."), GRU_RENAME])
    agg = conv.option("agg_func")
    return conv.finish(f"SCAN {direction} {agg}", BOOKKEEPING, fc_gru_sizes(conv.state_dict))
