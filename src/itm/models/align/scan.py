"""SCAN: stacked cross attention (Lee et al., ECCV 2018), methods.md section 3."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itm.models.align.base import (
    FEATURE_NORMS,
    AlignHead,
    Workspace,
    block_scores,
    check_direction,
    fast_softmax_ok,
    gram,
    gram_with_ones,
    i2t_cosine,
    i2t_weights,
    region_word_scores,
    sq_norm,
    t2i_cosine,
    t2i_weights,
)
from itm.models.align.base import soft_attention_scores as _soft
from itm.models.pooling import pool_scores


class SCAN(AlignHead):
    """Soft attention between regions and words, cosine per fragment, pooled.

    ``t2i``: every word attends to the regions of an image, score ``R_w = cos(e_w, att_w)``,
    pooled over the caption's valid words. ``i2t``: every region attends to the words, pooled
    over the image's valid regions. ``both`` adds the two pooled scores.

    Args:
        direction: ``t2i`` | ``i2t`` | ``both``.
        lambda_softmax: inverse temperature of the attention softmax (9 for t2i, 4 for i2t).
        feature_norm: normalisation of the raw scores across the query axis, one of
            ``clipped_l2norm`` (default, the code's), ``l2norm``, ``softmax``, ``clipped``,
            ``no_norm``.
    """

    def __init__(
        self,
        direction: str = "t2i",
        lambda_softmax: float = 9.0,
        feature_norm: str = "clipped_l2norm",
    ) -> None:
        super().__init__()
        self.direction = check_direction(direction)
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        self.lambda_softmax = float(lambda_softmax)
        self.feature_norm = feature_norm

    def forward(
        self, img: Tensor, img_mask: Tensor, cap: Tensor, cap_mask: Tensor, pooling: nn.Module
    ) -> Tensor:
        """``img [B1, K, d]``, ``img_mask [B1, K]``, ``cap [B2, L, d]``, ``cap_mask [B2, L]``
        -> ``[B1, B2]``."""
        s = region_word_scores(img, cap)
        out = None
        if self.direction in ("t2i", "both"):
            alpha = t2i_weights(s, img_mask, cap_mask, self.feature_norm, self.lambda_softmax)
            words = t2i_cosine(s, alpha, gram(img), sq_norm(cap))  # [B1, B2, L]
            out = pool_scores(pooling, words, cap_mask)
        if self.direction in ("i2t", "both"):
            alpha = i2t_weights(s, img_mask, cap_mask, self.feature_norm, self.lambda_softmax)
            regions = i2t_cosine(s, alpha, gram(cap), sq_norm(img))  # [B1, B2, K]
            pooled = pool_scores(pooling, regions, img_mask[:, None, :])
            out = pooled if out is None else out + pooled
        return out

    # --- block-wise inference ------------------------------------------------------------

    def _fast(self, x: Tensor) -> bool:
        return fast_softmax_ok(self.feature_norm, self.lambda_softmax, x.dtype)

    def prepare_images(self, img: Tensor, img_mask: Tensor) -> dict[str, Tensor]:
        if not self._fast(img):
            return {}
        out = {}
        if self.direction in ("t2i", "both"):
            out["gram1"] = gram_with_ones(img, img_mask)  # regions are the context
        if self.direction in ("i2t", "both"):
            out["sq"] = sq_norm(img)  # regions are the queries
        return out

    def prepare_captions(self, cap: Tensor, cap_mask: Tensor) -> dict[str, Tensor]:
        return caption_cache(cap, cap_mask, self.direction) if self._fast(cap) else {}

    def score_block(self, img, img_mask, cap, cap_mask, pooling, img_cache, cap_cache, ws):
        """Inference path: one matrix product per direction into a reused buffer, then the
        in-place soft-attention kernel (:func:`~itm.models.align.base.attend_cosine`)."""
        if not self._fast(img):
            return self(img, img_mask, cap, cap_mask, pooling)
        return scan_block(
            ws,
            img,
            img_mask,
            cap,
            cap_mask,
            pooling,
            img_cache,
            cap_cache,
            self.direction,
            self.feature_norm,
            self.lambda_softmax,
        )

    def extra_repr(self) -> str:
        return (
            f"direction={self.direction}, lambda_softmax={self.lambda_softmax}, "
            f"feature_norm={self.feature_norm}"
        )


def caption_cache(cap: Tensor, cap_mask: Tensor, direction: str) -> dict[str, Tensor]:
    """What every image block needs of a caption block: as queries (t2i) the word-major copy
    ``t [L, B2, d]`` and squared norms ``sq_t [L, B2]``; as context (i2t) ``[G ; 1]``."""
    out = {}
    if direction in ("t2i", "both"):
        out["t"] = cap.transpose(0, 1).contiguous()
        out["sq_t"] = sq_norm(out["t"])
    if direction in ("i2t", "both"):
        out["gram1"] = gram_with_ones(cap, cap_mask)
    return out


def scan_block(
    ws: Workspace,
    img: Tensor,
    img_mask: Tensor,
    cap: Tensor,
    cap_mask: Tensor,
    pooling: nn.Module | None,
    img_cache: dict[str, Tensor],
    cap_cache: dict[str, Tensor],
    direction: str,
    kind: str,
    lambda_softmax: float,
    focal: str | None = None,
) -> Tensor:
    """SCAN-style (and BFAN) scores of a block on the inference path: ``[B1, B2]``.

    t2i: ``s [B1, K, L*B2]`` (images = context, words item-major); i2t: ``[B2, L, K*B1]``
    (captions = context), so that in both directions the softmax runs over axis 1 and the
    Gram product is one batched matrix product. ``pooling=None`` means the mean (BFAN).
    """
    b1, b2 = img.shape[0], cap.shape[0]
    out = None
    if direction in ("t2i", "both"):
        s = block_scores(ws, "s", img, cap_cache["t"])
        words = _soft(
            ws,
            s,
            img_mask,
            img_cache["gram1"],
            cap_cache["sq_t"],
            b2,
            kind,
            lambda_softmax,
            focal,
        )  # [B1, L, B2]
        out = _pool(pooling, words.transpose(1, 2), cap_mask[None])
    if direction in ("i2t", "both"):
        # [K, B1, d], once per image block (the engine scores every caption block against it)
        img_t = ws.memo("img_t", lambda: img.transpose(0, 1).contiguous())
        s = block_scores(ws, "s", cap, img_t)
        regions = _soft(
            ws,
            s,
            cap_mask,
            cap_cache["gram1"],
            img_cache["sq"].T,
            b1,
            kind,
            lambda_softmax,
            focal,
        )  # [B2, K, B1]
        part = _pool(pooling, regions.transpose(1, 2), img_mask[None]).T
        out = part if out is None else out + part
    return out


def _pool(pooling: nn.Module | None, x: Tensor, mask: Tensor) -> Tensor:
    if pooling is not None:
        return pool_scores(pooling, x, mask)
    mask = mask.expand_as(x)
    total = torch.where(mask, x, x.new_zeros(())).sum(dim=-1)
    return total / mask.sum(dim=-1).clamp_min(1).to(x.dtype)
