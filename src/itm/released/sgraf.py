"""SGRAF (Diao et al., AAAI 2021; github Paranioar/SGRAF): similarity graph reasoning (SGR) and
attention filtration (SAF), each a separate model.

``checkpoint['model']`` = ``[img_enc, txt_enc, sim_enc]`` state dicts: ``fc``; ``embed`` and
``cap_rnn`` (the GRU); the ``EncoderSimilarity`` head, whose names map one to one onto itm's
SGRAF head (``v_global_w.embedding_local.0`` -> ``img_global.local_fc``, ...,
``SGR_module.{k}.graph_query_w`` -> ``sgr.{k}.query``, ``SAF_module.bn`` -> ``saf.bn``). The opt:
``module_name`` (SGR | SAF), ``sgr_step``, ``sim_dim``; the attention temperature 9, the 36
region slots of the image self-attention's BatchNorm and the dropout 0.4 (word embeddings and
self-attention, training only) are fixed in the authors' code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from itm.released.base import (
    BOOKKEEPING,
    Conversion,
    Released,
    fc_gru_sizes,
    map_encoders,
    map_training,
    model_list,
)

FORMAT, REPOSITORY = "SGRAF", "Paranioar/SGRAF"

MODULES = {"SGR": "sgr", "SAF": "saf"}

#: the authors' EncoderSimilarity names -> the itm SGRAF head's (architecture contract)
HEAD_RENAMES = [
    ("v_global_w.embedding_local.0.", "img_global.local_fc."),
    ("v_global_w.embedding_local.1.", "img_global.local_bn."),
    ("v_global_w.embedding_global.0.", "img_global.global_fc."),
    ("v_global_w.embedding_global.1.", "img_global.global_bn."),
    ("v_global_w.embedding_common.0.", "img_global.common_fc."),
    ("t_global_w.embedding_local.0.", "txt_global.local_fc."),
    ("t_global_w.embedding_global.0.", "txt_global.global_fc."),
    ("t_global_w.embedding_common.0.", "txt_global.common_fc."),
    ("sim_tranloc_w.", "sim_local."),
    ("sim_tranglo_w.", "sim_global."),
    ("sim_eval_w.", "sim_eval."),
    ("SAF_module.attn_sim_w.", "saf.attn."),
    ("SAF_module.bn.", "saf.bn."),
]


def graph_renames(steps: int) -> list[tuple[str, str]]:
    """``SGR_module.{k}.graph_query_w`` / ``graph_key_w`` / ``sim_graph_w`` -> ``sgr.{k}.query`` /
    ``key`` / ``graph``."""
    pairs = (("graph_query_w", "query"), ("graph_key_w", "key"), ("sim_graph_w", "graph"))
    return [(f"SGR_module.{k}.{a}.", f"sgr.{k}.{b}.") for k in range(steps) for a, b in pairs]


def matches(ckpt: Mapping[str, Any], opt: Mapping[str, Any]) -> bool:
    return (
        isinstance(ckpt.get("model"), (list, tuple))
        and len(ckpt["model"]) == 3
        and "module_name" in opt
    )


def convert(ckpt: Mapping[str, Any], path: str | Path) -> Released:
    conv = Conversion(ckpt, path, FORMAT, REPOSITORY)
    img, txt, head = model_list(conv, ckpt, 3)
    module = conv.choose("module_name", MODULES)
    conv.set("model/align", "sgraf", "module_name")
    conv.set("model.align.module", module, "module_name")
    conv.map("sim_dim", "model.align.sim_dim", int)
    steps = conv.map("sgr_step", "model.align.sgr_step", int, default=3)
    conv.set("model.align.lambda_softmax", 9.0)
    conv.set("model.align.num_region", 36)
    conv.set("model.align.dropout", 0.4)
    conv.set_if_offered(
        "model.text_encoder.dropout", 0.4, "dropout", "dropout on the word embeddings in training"
    )
    conv.note("lambda_softmax", "not read: SGRAF's attention temperature is fixed at 9")
    map_encoders(conv)
    map_training(conv)
    conv.weights(img, "model[0]", [("fc.", "image_encoder.fc.")])
    conv.weights(
        txt, "model[1]", [("embed.", "text_encoder.embed."), ("cap_rnn.", "text_encoder.rnn.")]
    )
    conv.weights(
        head,
        "model[2]",
        [(a, "similarity.align." + b) for a, b in HEAD_RENAMES + graph_renames(int(steps))],
    )
    return conv.finish(f"SGRAF {module.upper()}", BOOKKEEPING, fc_gru_sizes(conv.state_dict))
