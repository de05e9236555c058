"""CHAN: coding hard alignment (Pan et al., CVPR 2023), methods.md section 5."""

from __future__ import annotations

from torch import Tensor, nn

from itm.models.align.base import AlignHead, check_direction, region_word_scores
from itm.models.pooling import pool_scores


class CHAN(AlignHead):
    """Hard alignment: every fragment takes its best-matching fragment of the other modality.

    From the region-word scores ``s[r, w] = v_r . e_w`` (one matrix product per block):
    ``t2i`` (VHA, the method) scores each word by the max over the image's VALID regions of
    ``s[r, w]`` and pools those word scores over the caption's valid words; ``i2t`` (THA, an
    ablation) scores each region by the max over the caption's valid words and pools over the
    image's valid regions. No softmax, no attended vector. The released BiGRU recipe pools with
    ``LSEPool(lambda_lse=10, rescale=False)``, the BERT recipe with ``AvgPool``.

    Memory: the score tensor plus one masked copy, ``O(B1 * B2 * K * L)`` (see
    :meth:`bytes_per_pair`).

    Args:
        direction: ``t2i`` (default) | ``i2t``.
    """

    def __init__(self, direction: str = "t2i") -> None:
        super().__init__()
        self.direction = check_direction(direction, ("t2i", "i2t"))

    def forward(
        self, img: Tensor, img_mask: Tensor, cap: Tensor, cap_mask: Tensor, pooling: nn.Module
    ) -> Tensor:
        """``img [B1, K, d]``, ``img_mask [B1, K]``, ``cap [B2, L, d]``, ``cap_mask [B2, L]``
        -> ``[B1, B2]``."""
        s = region_word_scores(img, cap)  # [B1, K, B2, L]
        neg_inf = s.new_full((), float("-inf"))
        if self.direction == "t2i":
            words = s.where(img_mask[:, :, None, None], neg_inf).amax(dim=1)  # [B1, B2, L]
            return pool_scores(pooling, words, cap_mask[None])
        regions = s.where(cap_mask[None, None], neg_inf).amax(dim=3)  # [B1, K, B2]
        return pool_scores(pooling, regions.transpose(1, 2), img_mask[:, None, :])

    def bytes_per_pair(self, n_regions: int, n_words: int, elem_size: int) -> int:
        """The score tensor and its masked copy (two ``[K, L]`` buffers per pair), plus the
        per-fragment maxima and pooling temporaries (a few ``[K + L]`` vectors)."""
        return (2 * n_regions * n_words + 4 * (n_regions + n_words)) * elem_size

    def extra_repr(self) -> str:
        return f"direction={self.direction}"
