"""VSE-infinity (Chen et al., CVPR 2021; github woodfrog/vse_infty, branch bigru): BiGRU region model.

``checkpoint['model']`` = ``[img_enc, txt_enc]`` state dicts. The image encoder holds ``fc``,
the residual ``mlp`` (``layers.0`` Linear(2048, d/2), ``bns.0`` BatchNorm1d(d/2), ``layers.1``
Linear(d/2, d), and ``bns.1``, built and saved but never applied) and its GPO (``gpool.gru``,
``gpool.linear``); the text encoder ``embed`` (one row more than the vocabulary file:
``<mask>``, added at run time, not carried), ``rnn`` and its GPO. The pooled vectors are
l2-normalised and scored by their dot product (itm's global head with ``pooling=gpo``).
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
    map_training,
    model_list,
)
from itm.released.chan import drop_mask_row

FORMAT, REPOSITORY = "VSE-infinity", "woodfrog/vse_infty"

BACKBONE_ONLY = (
    "backbone_path",
    "backbone_source",
    "backbone_warmup_epochs",
    "backbone_lr_factor",
    "input_scale_factor",
    "embedding_warmup_epochs",
)


def matches(ckpt: Mapping[str, Any], opt: Mapping[str, Any]) -> bool:
    model = ckpt.get("model")
    return (
        isinstance(model, (list, tuple))
        and len(model) == 2
        and isinstance(model[1], Mapping)
        and any(str(k).startswith("gpool.") for k in model[1])
    )


def convert(ckpt: Mapping[str, Any], path: str | Path) -> Released:
    conv = Conversion(ckpt, path, FORMAT, REPOSITORY)
    img, txt = model_list(conv, ckpt, 2)
    conv.set("experiment", "vse_inf_bigru")
    conv.choose("precomp_enc_type", {"basic": "mlp"}, default="basic")
    conv.set("model/image_encoder", "mlp", "precomp_enc_type")
    for key in ("no_imgnorm", "no_txtnorm"):
        if conv.option(key, False):
            raise conv.unsupported(
                key, True, "itm's global head always l2-normalises the pooled vectors"
            )
        conv.explain(key, "False: the global head l2-normalises the pooled vector")
    conv.map("embed_size", "model.embed_size", int)
    conv.map("word_dim", "model.text_encoder.word_dim", int)
    conv.map("num_layers", "model.text_encoder.num_layers", int, default=1)
    conv.set("model.text_encoder.bidirectional", True)  # the authors' BiGRU: both directions
    map_training(conv)
    # the authors' adjust_learning_rate: x0.1 once at epoch lr_update (not every lr_update)
    conv.set("model.scheduler._target_", "itm.models.schedule.decay_once", "lr_update")
    conv.map("vse_mean_warmup_epochs", "model.warmup_epochs", int, default=0)
    drop = bool(conv.option("drop", True))
    conv.set("model.image_encoder.region_drop", 0.2 if drop else 0.0, "drop")
    conv.set("model.text_encoder.word_aug", 0.2 if drop else 0.0, "drop")
    if conv.choose("optim", {"adam": "AdamW"}, default="adam"):
        conv.explain("optim", "'adam': torch.optim.AdamW, weight decay 1e-4 (vse_inf_bigru)")
    for key in BACKBONE_ONLY:
        conv.note(key, "read only by the grid-feature (backbone) models")
    conv.note("reset_start_epoch", "the authors' resume option")
    conv.weights(
        img,
        "model[0]",
        [
            ("fc.", "image_encoder.fc."),
            ("mlp.layers.0.", "image_encoder.mlp.0."),
            ("mlp.bns.0.", "image_encoder.mlp.1."),
            ("mlp.layers.1.", "image_encoder.mlp.3."),
            ("gpool.gru.", "similarity.align.image_pool.gru."),
            ("gpool.linear.", "similarity.align.image_pool.scorer."),
        ],
        drop={"mlp.bns.1.": "built and saved, never applied (no BatchNorm after the last layer)"},
    )
    conv.weights(
        drop_mask_row(conv, txt, "model[1]"),
        "model[1]",
        [
            ("embed.", "text_encoder.embed."),
            GRU_RENAME,
            ("gpool.gru.", "similarity.align.text_pool.gru."),
            ("gpool.linear.", "similarity.align.text_pool.scorer."),
        ],
    )
    return conv.finish(
        "VSE-infinity BUTD region + BiGRU (GPO)", BOOKKEEPING, fc_gru_sizes(conv.state_dict)
    )
