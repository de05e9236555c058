"""SCAN: stacked cross attention (Lee et al., ECCV 2018; docs/scan.md).

Each word attends to the regions of an image (``t2i``) or each region to the words of a caption
(``i2t``) with the shared attention step (``attention.py``); a fragment's score is the cosine of
the fragment with its attended vector, and the ``pooling`` group reduces those scores.

PFAN (Wang et al., IJCAI 2019; docs/pfan.md) scores with SCAN plus one t2i term that only its
released code has: ``max_attn_bonus x pool_w(max_r alpha[w, r])``, each word's largest attention
weight, pooled like the main term (mean under ``avg``; LSE with the same lambda under ``lse``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itm.models.align.attention import (
    FEATURE_NORMS,
    gram,
    i2t_cosine,
    i2t_weights,
    pair_scores,
    region_word_scores,
    sq_norm,
    t2i_cosine,
    t2i_weights,
)
from itm.models.align.base import AlignHead, Block, check_direction
from itm.models.align.engine import (
    SelectHook,
    Workspace,
    block_scores,
    context_gram,
    fast_softmax_ok,
    soft_attention_scores,
)
from itm.models.pooling import pool_scores

__all__ = ["SCAN", "PeakWeights", "caption_cache", "image_cache", "scan_block"]


class SCAN(AlignHead):
    """Soft attention between regions and words, cosine per fragment, pooled.

    Supports bf16 scoring (``supports_bf16``): the block's region-word product in bfloat16.

    ``t2i``: every word attends to the regions of an image, score ``R_w = cos(e_w, att_w)``,
    pooled over the caption's valid words. ``i2t``: every region attends to the words, pooled
    over the image's valid regions. ``both`` adds the two pooled scores.

    Args:
        direction: ``t2i`` | ``i2t`` | ``both``.
        lambda_softmax: inverse temperature of the attention softmax (9 for t2i, 4 for i2t).
        feature_norm: normalisation of the raw scores across the query axis, one of
            ``clipped_l2norm`` (default, the code's), ``l2norm``, ``softmax``, ``clipped``,
            ``no_norm``.
        max_attn_bonus: PFAN's extra t2i term (0 = plain SCAN; the PFAN t2i recipe uses 0.5):
            the t2i score gains ``max_attn_bonus x pool_w(max_r alpha[w, r])``, pooled by the
            same pooling as the cosines. The i2t part never gets it.
    """

    supports_bf16 = True

    def __init__(
        self,
        direction: str = "t2i",
        lambda_softmax: float = 9.0,
        feature_norm: str = "clipped_l2norm",
        max_attn_bonus: float = 0.0,
    ) -> None:
        super().__init__()
        self.direction = check_direction(direction)
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        self.lambda_softmax = float(lambda_softmax)
        self.feature_norm = feature_norm
        self.max_attn_bonus = float(max_attn_bonus)

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
            if self.max_attn_bonus:  # PFAN: each word's largest weight (padded regions hold 0)
                peak = alpha.amax(dim=1)  # [B1, B2, L]
                out = out + self.max_attn_bonus * pool_scores(pooling, peak, cap_mask)
        if self.direction in ("i2t", "both"):
            alpha = i2t_weights(s, img_mask, cap_mask, self.feature_norm, self.lambda_softmax)
            regions = i2t_cosine(s, alpha, gram(cap), sq_norm(img))  # [B1, B2, K]
            pooled = pool_scores(pooling, regions, img_mask[:, None, :])
            out = pooled if out is None else out + pooled
        assert out is not None
        return out

    def weights(self, s: Tensor, img_mask: Tensor, cap_mask: Tensor, direction: str) -> Tensor:
        """Attention weights ``alpha [B1, K, B2, L]`` of one direction from the raw scores."""
        fn = t2i_weights if direction == "t2i" else i2t_weights
        return fn(s, img_mask, cap_mask, self.feature_norm, self.lambda_softmax)

    def alignment(self, img: Tensor, cap: Tensor) -> Tensor:
        """The soft attention of the head's first direction, ``[L, K]``: t2i (and ``both``)
        each word's softmax over the regions; i2t each region's softmax over the words."""
        s, ones_i, ones_c = pair_scores(img, cap)
        direction = "i2t" if self.direction == "i2t" else "t2i"
        return self.weights(s, ones_i, ones_c, direction)[0, :, 0, :].T

    @property
    def alignment_normalised(self) -> str:
        return "words" if self.direction == "i2t" else "regions"

    # --- block-wise inference ------------------------------------------------------------

    def _fast(self, x: Tensor) -> bool:
        return fast_softmax_ok(self.feature_norm, self.lambda_softmax, x.dtype)

    def prepare_images(self, img: Tensor, img_mask: Tensor) -> dict[str, Tensor]:
        return image_cache(img, img_mask, self.direction) if self._fast(img) else {}

    def prepare_captions(self, cap: Tensor, cap_mask: Tensor) -> dict[str, Tensor]:
        return caption_cache(cap, cap_mask, self.direction) if self._fast(cap) else {}

    def score_block(
        self, images: Block, captions: Block, pooling: nn.Module | None, ws: Workspace
    ) -> Tensor:
        """Inference path: one matrix product per direction into a reused buffer, then the
        in-place soft-attention kernel (:func:`~itm.models.align.engine.soft_attention_scores`)."""
        if not self._fast(images.emb):
            return super().score_block(images, captions, pooling, ws)
        assert pooling is not None
        return scan_block(
            ws,
            images,
            captions,
            pooling,
            self.direction,
            self.feature_norm,
            self.lambda_softmax,
            max_attn_bonus=self.max_attn_bonus,
        )

    def extra_repr(self) -> str:
        bonus = f", max_attn_bonus={self.max_attn_bonus}" if self.max_attn_bonus else ""
        return (
            f"direction={self.direction}, lambda_softmax={self.lambda_softmax}, "
            f"feature_norm={self.feature_norm}{bonus}"
        )


class PeakWeights:
    """A :class:`~itm.models.align.engine.SelectHook` that records ``max_r alpha[r, q]`` of every
    query item and leaves the weights alone (PFAN's bonus on the inference path).

    The kernel hands it the unnormalised weights ``w [Bc, Kc, N]`` of one chunk of context sets
    after another (0 at padded context items), so ``max_r w / sum_r w`` is the largest softmax
    weight; :meth:`result` stacks the chunks in order, ``[Bc_total, Lq, Bq]``."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []

    def __call__(self, w: Tensor, scratch: Tensor, ctx_mask: Tensor) -> None:
        self.parts.append(w.amax(dim=1).div_(w.sum(dim=1)))

    def result(self, n_query_sets: int) -> Tensor:
        peak = self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)
        return peak.view(peak.shape[0], -1, n_query_sets)


def image_cache(img: Tensor, img_mask: Tensor, direction: str) -> dict[str, Tensor]:
    """What every caption block needs of the images: as context (t2i) the Gram matrices
    (:func:`~itm.models.align.engine.context_gram`, keys ``gram1`` / ``gram_scale``); as
    queries (i2t) the squared region norms ``sq [B1, K]``."""
    out: dict[str, Tensor] = {}
    if direction in ("t2i", "both"):
        out.update(context_gram(img, img_mask))
    if direction in ("i2t", "both"):
        out["sq"] = sq_norm(img)
    return out


def caption_cache(cap: Tensor, cap_mask: Tensor, direction: str) -> dict[str, Tensor]:
    """What every image block needs of a caption block: as queries (t2i) the word-major copy
    ``t [L, B2, d]`` and squared norms ``sq_t [L, B2]``; as context (i2t) the Gram matrices
    (keys ``ctx_gram1`` / ``ctx_gram_scale``)."""
    out: dict[str, Tensor] = {}
    if direction in ("t2i", "both"):
        out["t"] = cap.transpose(0, 1).contiguous()
        out["sq_t"] = sq_norm(out["t"])
    if direction in ("i2t", "both"):
        out.update({f"ctx_{k}": v for k, v in context_gram(cap, cap_mask).items()})
    return out


def scan_block(
    ws: Workspace,
    images: Block,
    captions: Block,
    pooling: nn.Module,
    direction: str,
    kind: str,
    lambda_softmax: float,
    select: SelectHook | None = None,
    max_attn_bonus: float = 0.0,
) -> Tensor:
    """SCAN-style scores of a block on the inference path: ``[B1, B2]`` (BFAN reuses it with
    its focal ``select`` hook and mean pooling; PFAN's ``max_attn_bonus`` adds its pooled peak
    weights to the t2i part, read by a :class:`PeakWeights` hook).

    t2i: ``s [B1, K, L*B2]`` (images = context, words item-major); i2t: ``[B2, L, K*B1]``
    (captions = context), so that in both directions the softmax runs over axis 1 and the
    Gram product is one batched matrix product. In bf16 scoring the products take the blocks'
    bfloat16 embeddings (:attr:`~itm.models.align.base.Block.lowp`); the Gram matrices and
    norms stay float32.
    """
    img_mask, cap_mask = images.mask, captions.mask
    lowp = images.lowp is not None
    img, cap = images.product, captions.product
    b1, b2 = img.shape[0], cap.shape[0]
    out = None
    if direction in ("t2i", "both"):
        # the words word-major, [L, B2, d] (float32: prepared once per caption block)
        cap_t = (
            ws.memo("cap_t", captions.key, lambda: cap.transpose(0, 1).contiguous())
            if lowp
            else captions.cache["t"]
        )
        s = block_scores(ws, "s", img, cap_t)
        if max_attn_bonus and select is not None:
            raise ValueError("max_attn_bonus does not combine with a select hook (BFAN)")
        peaks = PeakWeights() if max_attn_bonus else None
        words = soft_attention_scores(
            ws,
            s,
            img_mask,
            images.cache,
            captions.cache["sq_t"],
            b2,
            kind,
            lambda_softmax,
            peaks or select,
        )  # [B1, L, B2]
        out = pool_scores(pooling, words.transpose(1, 2), cap_mask[None])
        if peaks is not None:
            peak = peaks.result(b2)  # [B1, L, B2]
            out = out + max_attn_bonus * pool_scores(pooling, peak.transpose(1, 2), cap_mask[None])
    if direction in ("i2t", "both"):
        # [K, B1, d], once per image block (the engine scores every caption block against it)
        img_t = ws.memo("img_t", images.key, lambda: img.transpose(0, 1).contiguous())
        s = block_scores(ws, "s", cap, img_t)
        ctx = {"gram1": captions.cache["ctx_gram1"], "gram_scale": captions.cache["ctx_gram_scale"]}
        regions = soft_attention_scores(
            ws, s, cap_mask, ctx, images.cache["sq"].T, b1, kind, lambda_softmax, select
        )  # [B2, K, B1]
        part = pool_scores(pooling, regions.transpose(1, 2), img_mask[None]).T
        out = part if out is None else out + part
    assert out is not None
    return out
