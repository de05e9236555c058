"""SCAN: stacked cross attention (Lee et al., ECCV 2018), methods.md section 3."""

from __future__ import annotations

from torch import Tensor, nn

from itm.models.align.base import (
    FEATURE_NORMS,
    AlignHead,
    check_direction,
    gram,
    i2t_cosine,
    i2t_weights,
    region_word_scores,
    sq_norm,
    t2i_cosine,
    t2i_weights,
)
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

    def extra_repr(self) -> str:
        return (
            f"direction={self.direction}, lambda_softmax={self.lambda_softmax}, "
            f"feature_norm={self.feature_norm}"
        )
