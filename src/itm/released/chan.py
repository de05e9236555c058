"""CHAN (Pan et al., CVPR 2023; github ppanzx/CHAN): hard alignment, BiGRU models.

``checkpoint['model']`` = ``[img_enc, txt_enc, sim_enc, criterion]`` state dicts (the last two
are empty for the hard codings with Max / Mean / Sum / LSE pooling). The image encoder holds
``fc`` and, with ``--precomp_enc_type=selfattention`` (the released BiGRU recipe),
``feedforward.ln`` / ``feedforward.attn`` (itm's ``selfattn`` encoder). The text encoder holds
``embed`` with one row more than the vocabulary file (``<mask>``, added at run time, used only
by training-time word masking; itm masks with ``<unk>``, so the row is not carried), ``rnn``, and
an ``fc`` that its forward pass never uses. The opt: ``coding_type`` (VHACoding = the method,
t2i; THACoding = i2t), ``pooling_type`` with ``belta`` (LSE temperature: lambda = 1 / belta,
no 1/lambda rescale).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from itm.checkpoint import CheckpointError
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

FORMAT, REPOSITORY = "CHAN", "ppanzx/CHAN"

CODINGS = {"VHACoding": "t2i", "THACoding": "i2t"}
POOLINGS = {"LSEPooling": "lse", "MeanPooling": "avg", "MaxPooling": "max", "SumPooling": "sum"}
IMAGE_ENCODERS = {"basic": "fc", "selfattention": "selfattn"}


def matches(ckpt: Mapping[str, Any], opt: Mapping[str, Any]) -> bool:
    return (
        isinstance(ckpt.get("model"), (list, tuple))
        and len(ckpt["model"]) == 4
        and "coding_type" in opt
    )


def drop_mask_row(conv: Conversion, txt: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The text state dict without the run-time ``<mask>`` row of ``embed.weight`` (the last
    row; checked against the opt's ``word2idx`` when it has one)."""
    txt = dict(txt)
    table = txt.get("embed.weight")
    if table is None:
        raise CheckpointError(f"{conv.path}: {where} has no embed.weight")
    word2idx = conv.option("word2idx", None)
    mask = word2idx.get("<mask>") if isinstance(word2idx, Mapping) else table.shape[0] - 1
    if mask is None:  # a vocabulary without <mask>: every row is a word
        return txt
    if mask != table.shape[0] - 1:
        raise CheckpointError(
            f"{conv.path}: {where}[embed.weight] has {table.shape[0]} rows, but the opt's "
            f"word2idx puts <mask> at {mask} (expected the last row)"
        )
    txt["embed.weight"] = table[:mask]
    conv.dropped[f"{where}[embed.weight] row {mask}"] = (
        "<mask>, added to the vocabulary at run time for training-time word masking (itm masks "
        "with <unk>; captions never hold it)"
    )
    return txt


def size_augmentation(conv: Conversion) -> None:
    """``drop`` switches the training split's size augmentation on: regions dropped with
    ``obj_drop_rate``, words masked / replaced / deleted with p 0.2 (fixed in the code)."""
    drop = bool(conv.option("drop", False))
    rate = float(conv.option("obj_drop_rate", 0.2))
    conv.set("model.image_encoder.region_drop", rate if drop else 0.0, "drop", "obj_drop_rate")
    conv.set("model.text_encoder.word_aug", 0.2 if drop else 0.0, "drop")


def convert(ckpt: Mapping[str, Any], path: str | Path) -> Released:
    conv = Conversion(ckpt, path, FORMAT, REPOSITORY)
    img, txt, sim, crit = model_list(conv, ckpt, 4)
    conv.choose("text_enc_type", {"bigru": "bigru"}, default="bigru")
    conv.set("experiment", "chan_bigru", "text_enc_type")
    encoder = conv.choose("precomp_enc_type", IMAGE_ENCODERS, default="basic")
    conv.set("model/image_encoder", encoder, "precomp_enc_type")
    direction = conv.choose("coding_type", CODINGS)
    conv.set("model.align.direction", direction, "coding_type")
    conv.note("alpha", "read only by VSACoding (soft assignment)")
    pooling = conv.choose("pooling_type", POOLINGS)
    conv.set("pooling", pooling, "pooling_type")
    if pooling == "lse":
        conv.map("belta", "model.pooling.lambda_lse", lambda b: 1.0 / float(b))
        conv.set("model.pooling.rescale", False, "pooling_type")
    else:  # the recipe's LSE settings do not apply to the other poolings
        conv.overrides += ["~model.pooling.lambda_lse", "~model.pooling.rescale"]
        conv.note("belta", "read only by LSEPooling / SoftmaxPooling")
    map_encoders(conv, bidirectional=True)  # CHAN builds the BiGRU with use_bi_gru=True
    map_training(conv)
    # the authors' adjust_learning_rate: x0.1 once at epoch lr_update (not every lr_update)
    conv.set("model.scheduler._target_", "itm.models.schedule.decay_once", "lr_update")
    conv.map("vse_mean_warmup_epochs", "model.warmup_epochs", int, default=0)
    size_augmentation(conv)
    if conv.choose("optim", {"adam": "AdamW"}, default="adam"):
        conv.explain("optim", "'adam': torch.optim.AdamW, weight decay 0.01 (chan_bigru)")
    if conv.option("criterion", "ContrastiveLoss") == "ContrastiveLoss":
        conv.explain("criterion", "'ContrastiveLoss': model.loss (itm.models.ContrastiveLoss)")
    else:
        conv.note("criterion", "no itm counterpart (itm trains with the hinge ContrastiveLoss)")
    conv.note("temperature", "read only by CHAN's other criteria")
    conv.note(
        "wemb_type",
        "the trained word table is in the checkpoint; a new model starts from GloVe with "
        "model.text_encoder.glove_path",
    )
    conv.note("word2idx", "the authors' training vocabulary (itm encodes with data.vocab_path)")
    for key in ("embedding_warmup_epochs", "input_scale_factor", "reset_start_epoch"):
        conv.note(key, "not read by CHAN's BiGRU region models")
    for where, part in (("model[2]", sim), ("model[3]", crit)):
        if len(part):
            raise CheckpointError(
                f"{path}: CHAN checkpoint whose {where} holds weights ({', '.join(list(part)[:4])}); "
                "the hard codings itm supports have none"
            )
    img_rules = [("fc.", "image_encoder.fc.")]
    if encoder == "selfattn":
        img_rules += [
            ("feedforward.ln.", "image_encoder.ln."),
            ("feedforward.attn.", "image_encoder.attn."),
        ]
    conv.weights(img, "model[0]", img_rules)
    conv.weights(
        drop_mask_row(conv, txt, "model[1]"),
        "model[1]",
        [("embed.", "text_encoder.embed."), GRU_RENAME],
        drop={"fc.": "built and saved, never used by CHAN's EncoderTextBigru.forward"},
    )
    variant = f"CHAN BiGRU {conv.option('coding_type')} + {conv.option('pooling_type')}"
    variant += f", {conv.option('precomp_enc_type', 'basic')} image encoder"
    return conv.finish(variant, BOOKKEEPING, fc_gru_sizes(conv.state_dict))
