"""CHAN: coding hard alignment (Pan et al., CVPR 2023; docs/chan.md).

Every word takes its best-matching region (no softmax, no attended vector); the ``pooling``
group reduces those word scores.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itm.models.align.attention import region_word_scores
from itm.models.align.base import AlignHead, Block, check_direction
from itm.models.align.engine import Workspace, block_scores, invalid_rows
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

    supports_bf16 = True  # the block's product in bfloat16

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

    def alignment(self, img: Tensor, cap: Tensor) -> Tensor:
        """Hard alignment ``[L, K]``: 1 at the best region of each word (t2i) or at the best
        word of each region (i2t), 0 elsewhere."""
        scores = cap @ img.T  # [L, K]
        out = torch.zeros_like(scores)
        if self.direction == "t2i":
            out[torch.arange(scores.shape[0]), scores.argmax(dim=1)] = 1.0
        else:
            out[scores.argmax(dim=0), torch.arange(scores.shape[1])] = 1.0
        return out

    @property
    def alignment_normalised(self) -> str:
        return "regions" if self.direction == "t2i" else "words"

    # --- block-wise inference ------------------------------------------------------------

    def prepare_captions(self, cap: Tensor, cap_mask: Tensor) -> dict[str, Tensor]:
        """t2i: the block's VALID words only, packed word-major (``[n_valid, d]``: word ``w``
        of every caption that has one, then word ``w + 1``, ...), so the block's matrix product
        spends nothing on padding; ``cols`` (when some word is padded) holds each packed word's
        slot in the padded word-major layout ``w * B2 + j``."""
        if self.direction != "t2i":
            return {}
        b2, n, d = cap.shape
        words = cap.transpose(0, 1).reshape(n * b2, d)  # word-major
        cols = invalid_rows(~cap_mask.T)  # the VALID slots, word-major
        if cols is None:  # no padded word
            return {"t": words.contiguous()}
        return {"t": words.index_select(0, cols), "cols": cols}

    def score_block(
        self, images: Block, captions: Block, pooling: nn.Module | None, ws: Workspace
    ) -> Tensor:
        """Inference path: one matrix product into a reused buffer (context items on axis 1,
        the other modality item-major; for t2i only the valid words), padded context rows set
        to -inf in place, a max over axis 1, then pooling of the ``[B1, B2, *]`` fragment
        maxima. bf16 scoring: the product in bfloat16, the maxima widened to float32."""
        lowp = images.lowp is not None
        img, cap = images.product, captions.product
        img_mask, cap_mask, cap_cache = images.mask, captions.mask, captions.cache
        if self.direction == "t2i":
            words = cap_cache["t"]
            if lowp:  # once per caption block
                words = ws.memo("t_lp", captions.key, lambda: cap_cache["t"].to(torch.bfloat16))
            s = block_scores(ws, "s", img, words[:, None])  # [B1, K, n_valid]
            ctx_mask, n_sets, pool_mask = img_mask, cap.shape[0], cap_mask[None]
        else:
            # [K, B1, d], once per image block
            img_t = ws.memo("img_t", images.key, lambda: img.transpose(0, 1).contiguous())
            s = block_scores(ws, "s", cap, img_t)  # [B2, L, K*B1]
            ctx_mask, n_sets, pool_mask = cap_mask, img.shape[0], img_mask[None]
        bc, kc, n = s.shape
        pad = invalid_rows(ctx_mask)
        if pad is not None:
            s.view(bc * kc, n).index_fill_(0, pad, float("-inf"))
        best = torch.amax(s, dim=1)  # [Bc, n]
        if best.dtype == torch.bfloat16:  # bf16 scoring: pool in float32
            best = best.float()
        cols = cap_cache.get("cols")
        if cols is not None:  # back to the padded word-major layout (padded words: 0)
            full = best.new_zeros(bc, cap.shape[0] * cap.shape[1])
            best = full.index_copy_(1, cols, best)
        best = best.view(bc, -1, n_sets).transpose(1, 2)
        assert pooling is not None, "CHAN pools its fragment scores"
        out = pool_scores(pooling, best, pool_mask)
        return out if self.direction == "t2i" else out.T

    def bytes_per_pair(self, n_regions: int, n_words: int, elem_size: int) -> int:
        """The score tensor and its masked copy (two ``[K, L]`` buffers per pair), plus the
        per-fragment maxima and pooling temporaries (a few ``[K + L]`` vectors)."""
        return (2 * n_regions * n_words + 4 * (n_regions + n_words)) * elem_size

    def extra_repr(self) -> str:
        return f"direction={self.direction}"
