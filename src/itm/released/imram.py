"""IMRAM (Chen et al., CVPR 2020; github HuiChen24/IMRAM): recurrent attention memory.

``checkpoint['model']`` is ONE state dict of ``nn.DataParallel(SCAN(opt))``, keys prefixed
``module.``: ``img_enc.fc_local``, ``txt_enc.embed``, ``txt_enc.rnn``, and both memory
distillation units (``linear_t2i`` / ``gate_t2i`` for the word queries, ``linear_i2t`` /
``gate_i2t`` for the region queries) whatever the mode. The opt: ``model_mode`` (full_IMRAM |
text_IMRAM | image_IMRAM), ``iteration_step``, ``lambda_softmax``, ``no_IMRAM_norm``. Its
``*_IMRAM`` scorers always average the fragment scores (``agg_func`` is not read) and normalise
the attention with clipped_l2norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from itm.checkpoint import CheckpointError
from itm.released.base import (
    BOOKKEEPING,
    Conversion,
    Released,
    describe,
    fc_gru_sizes,
    map_encoders,
    map_training,
)

FORMAT, REPOSITORY = "IMRAM", "HuiChen24/IMRAM"

#: model_mode -> (itm recipe, direction)
MODES = {
    "full_IMRAM": ("imram_full", "both"),
    "text_IMRAM": ("imram_text", "t2i"),
    "image_IMRAM": ("imram_image", "i2t"),
}


def _keys(ckpt: Mapping[str, Any]) -> list[str]:
    model = ckpt.get("model")
    return [str(k) for k in model] if isinstance(model, Mapping) else []


def matches(ckpt: Mapping[str, Any], opt: Mapping[str, Any]) -> bool:
    keys = _keys(ckpt)
    return "model_mode" in opt and any(
        k.split("module.", 1)[-1].startswith("img_enc.") for k in keys
    )


def convert(ckpt: Mapping[str, Any], path: str | Path) -> Released:
    conv = Conversion(ckpt, path, FORMAT, REPOSITORY)
    model = ckpt.get("model")
    if not isinstance(model, Mapping):
        raise CheckpointError(f"{path}: IMRAM checkpoint whose 'model' is {describe(model)}")
    recipe, direction = conv.choose("model_mode", MODES)
    mode = conv.option("model_mode")
    conv.set("experiment", recipe, "model_mode")
    conv.set("model.align.direction", direction, "model_mode")
    conv.choose("precomp_enc_type", {"basic": "fc"}, default="basic")
    conv.set("model/image_encoder", "fc", "precomp_enc_type")
    conv.map("iteration_step", "model.align.steps", int)
    conv.map("lambda_softmax", "model.align.lambda_softmax", float)
    conv.map("no_IMRAM_norm", "model.align.renorm_memory", lambda v: not v)
    conv.choose("raw_feature_norm", {"clipped_l2norm": None}, default="clipped_l2norm")
    conv.explain("raw_feature_norm", "clipped_l2norm (the IMRAM head's attention norm)")
    if conv.option("pos_emb", False):
        raise conv.unsupported("pos_emb", True, "IMRAM's position embedding has no itm counterpart")
    conv.note("agg_func", "not read by IMRAM's scorers (they average the fragment scores)")
    conv.note("cross_attn", "not read by IMRAM (model_mode chooses the directions)")
    conv.note("lambda_lse", "not read by IMRAM")
    conv.note("pos_emb", "IMRAM's position embedding, off")
    map_encoders(conv)
    map_training(conv)
    renames = [
        ("img_enc.fc_local.", "image_encoder.fc."),
        ("txt_enc.embed.", "text_encoder.embed."),
        ("txt_enc.rnn.", "text_encoder.rnn."),
    ]
    drop = {}
    for branch, used in (("t2i", direction != "i2t"), ("i2t", direction != "t2i")):
        if used:
            renames += [
                (f"linear_{branch}.", f"similarity.align.mdu_{branch}.candidate."),
                (f"gate_{branch}.", f"similarity.align.mdu_{branch}.gate."),
            ]
        else:
            reason = f"the {branch} memory unit, not used in {mode} mode"
            drop.update({f"linear_{branch}.": reason, f"gate_{branch}.": reason})
    # nn.DataParallel's "module." prefix
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in model.items()}
    conv.weights(state, "model", renames, drop)
    return conv.finish(f"IMRAM {mode}", BOOKKEEPING, fc_gru_sizes(conv.state_dict))
