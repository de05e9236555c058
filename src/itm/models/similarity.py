"""Similarity = alignment head + pooling, with block-wise full-matrix scoring.

Public contract (the README's Python API; docs/adding_a_head.md)::

    sim = Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling))
    scores = sim(img, img_lens, cap, cap_lens)              # [n_images, n_captions]
    scores = sim.score_matrix(img, img_lens, cap, cap_lens, max_block_mb=256)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from itm.models.align import engine
from itm.models.align.base import AlignHead
from itm.models.functional import lengths_to_mask

__all__ = ["Similarity", "check_inputs", "lengths_to_mask"]


def check_inputs(img: Tensor, img_lens: Tensor, cap: Tensor, cap_lens: Tensor) -> None:
    """Shape and length checks with readable messages (cheap: no data-dependent sync on GPU
    beyond two min/max reductions)."""
    if img.dim() != 3 or cap.dim() != 3:
        raise ValueError(
            f"expected img [B1, K, d] and cap [B2, L, d], got {tuple(img.shape)} and "
            f"{tuple(cap.shape)}"
        )
    if img.shape[-1] != cap.shape[-1]:
        raise ValueError(f"embedding sizes differ: img d={img.shape[-1]}, cap d={cap.shape[-1]}")
    for name, lens, x in (("img_lens", img_lens, img), ("cap_lens", cap_lens, cap)):
        if lens.dim() != 1 or lens.shape[0] != x.shape[0]:
            raise ValueError(f"{name} must have shape [{x.shape[0]}], got {tuple(lens.shape)}")
        if lens.numel() and (int(lens.min()) < 1 or int(lens.max()) > x.shape[1]):
            raise ValueError(
                f"{name} must lie in 1..{x.shape[1]} (the padded size), got "
                f"min {int(lens.min())}, max {int(lens.max())}"
            )


class Similarity(nn.Module):
    """Scores every (image, caption) pair of two sets of fragment embeddings.

    Args:
        align: an :class:`~itm.models.align.base.AlignHead` (``model/align=...``).
        pooling: a set pooling module (``pooling=...``), or None for a head that aggregates by
            itself. What happens to it depends on the head's ``pooling_role``: ``fragments``
            heads reduce their fragment scores with it (it is held here); a ``features`` head
            keeps its own copies (none is held here, so DDP sees no parameter without
            gradient); a ``fixed`` head refuses any pooling but its own aggregation.
    """

    def __init__(self, align: AlignHead, pooling: nn.Module | None) -> None:
        super().__init__()
        self.align = align
        align.bind_pooling(pooling)
        self.pooling = pooling if align.pooling_role == "fragments" else None
        if align.pooling_role == "fragments" and pooling is None:
            raise ValueError(f"{type(align).__name__} pools its fragment scores: give a pooling")

    def forward(self, img: Tensor, img_lens: Tensor, cap: Tensor, cap_lens: Tensor) -> Tensor:
        """``img [B1, K, d]``, ``img_lens [B1]``, ``cap [B2, L, d]``, ``cap_lens [B2]``
        -> scores ``[B1, B2]``."""
        check_inputs(img, img_lens, cap, cap_lens)
        img_mask = lengths_to_mask(img_lens, img.shape[1])
        cap_mask = lengths_to_mask(cap_lens, cap.shape[1])
        return self.align(img, img_mask, cap, cap_mask, self.pooling)

    #: captions per block (CPU favours 64-128; larger blocks only grow the workspace)
    max_caption_block: int = engine.MAX_CAPTION_BLOCK

    def block_sizes(
        self, n_regions: int, n_words: int, elem_size: int, max_block_mb: float, n_img: int
    ) -> tuple[int, int]:
        """(images, captions) per block under ``max_block_mb`` (:func:`engine.block_sizes`)."""
        return engine.block_sizes(
            self.align, n_regions, n_words, elem_size, max_block_mb, n_img, self.max_caption_block
        )

    @torch.no_grad()
    def score_matrix(
        self,
        img: Tensor,
        img_lens: Tensor,
        cap: Tensor,
        cap_lens: Tensor,
        max_block_mb: float = 256,
        progress: Callable[[int], None] | None = None,
        precision: str = "fp32",
        exact_top: int = engine.BF16_EXACT_TOP,
    ) -> Tensor:
        """The full ``[n_images, n_captions]`` score matrix, computed block by block under the
        memory budget ``max_block_mb`` (:func:`itm.models.align.engine.score_matrix`); equal
        to ``self(...)``.

        Args:
            progress: optional callback receiving the number of pairs scored by each block.
            precision: ``fp32`` (exact; the default) or ``bf16`` (the large products in
                bfloat16; heads that cannot refuse it).
            exact_top: bf16: the best pairs of every row and column scored again in float32
                (:func:`itm.models.align.engine.rescore_top`); 0 turns it off.
        """
        check_inputs(img, img_lens, cap, cap_lens)
        return engine.score_matrix(
            self.align,
            self.pooling,
            img,
            img_lens,
            cap,
            cap_lens,
            max_block_mb,
            progress,
            self.max_caption_block,
            precision=precision,
            exact_top=exact_top,
        )
