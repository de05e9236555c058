"""Similarity = alignment head + pooling, with block-wise full-matrix scoring.

Public contract (architecture.md)::

    sim = Similarity(instantiate(cfg.model.align), instantiate(cfg.model.pooling))
    scores = sim(img, img_lens, cap, cap_lens)              # [n_images, n_captions]
    scores = sim.score_matrix(img, img_lens, cap, cap_lens, max_block_mb=256)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from itm.models.align.base import AlignHead


def lengths_to_mask(lengths: Tensor, size: int) -> Tensor:
    """``lengths [B]`` -> bool mask ``[B, size]`` (True for the first ``lengths[b]`` slots)."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


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
        pooling: a set pooling module (``pooling=...``). Heads that pool features themselves
            (``global``) copy it; otherwise it reduces fragment scores and is held here.
    """

    def __init__(self, align: AlignHead, pooling: nn.Module) -> None:
        super().__init__()
        self.align = align
        align.bind_pooling(pooling)
        # A head that owns copies of the pooling must not leave an unused copy here (DDP would
        # complain about parameters that receive no gradient).
        self.pooling = None if align.owns_pooling else pooling

    def forward(self, img: Tensor, img_lens: Tensor, cap: Tensor, cap_lens: Tensor) -> Tensor:
        """``img [B1, K, d]``, ``img_lens [B1]``, ``cap [B2, L, d]``, ``cap_lens [B2]``
        -> scores ``[B1, B2]``."""
        check_inputs(img, img_lens, cap, cap_lens)
        return self._score(img, img_lens, cap, cap_lens)

    def _score(self, img: Tensor, img_lens: Tensor, cap: Tensor, cap_lens: Tensor) -> Tensor:
        img_mask = lengths_to_mask(img_lens, img.shape[1])
        cap_mask = lengths_to_mask(cap_lens, cap.shape[1])
        return self.align(img, img_mask, cap, cap_mask, self.pooling)

    def block_sizes(
        self, n_regions: int, n_words: int, elem_size: int, max_block_mb: float, n_img: int
    ) -> tuple[int, int]:
        """(images, captions) per block so that the head's workspace fits ``max_block_mb``."""
        per_pair = max(1, self.align.bytes_per_pair(n_regions, n_words, elem_size))
        pairs = max(1, int(max_block_mb * 2**20) // per_pair)
        n_cap_block = max(1, min(128, pairs))
        n_img_block = max(1, min(n_img, pairs // n_cap_block))
        return n_img_block, n_cap_block

    @torch.no_grad()
    def score_matrix(
        self,
        img: Tensor,
        img_lens: Tensor,
        cap: Tensor,
        cap_lens: Tensor,
        max_block_mb: float = 256,
        progress: Callable[[int], None] | None = None,
    ) -> Tensor:
        """The full ``[n_images, n_captions]`` score matrix, computed block by block.

        Captions are sorted by length and each block is padded only to its own longest
        caption; block sizes come from the head's workspace estimate and ``max_block_mb``, so
        peak memory does not grow with the number of images or captions (beyond the inputs and
        the output). Scores are independent per pair, so the result equals ``self(...)``.

        Args:
            progress: optional callback receiving the number of pairs scored by each block.
        """
        check_inputs(img, img_lens, cap, cap_lens)
        n_img, n_cap = img.shape[0], cap.shape[0]
        out = img.new_empty(n_img, n_cap)
        if n_img == 0 or n_cap == 0:
            return out
        order = torch.argsort(cap_lens, descending=True, stable=True)
        sorted_lens = cap_lens[order]
        k_max = int(img_lens.max())
        img = img[:, :k_max]
        start = 0
        while start < n_cap:
            n_words = int(sorted_lens[start])  # longest caption of this block (sorted)
            b1, b2 = self.block_sizes(k_max, n_words, img.element_size(), max_block_mb, n_img)
            idx = order[start : start + b2]
            cap_blk = cap[idx, :n_words]
            lens_blk = cap_lens[idx]
            for i0 in range(0, n_img, b1):
                scores = self._score(img[i0 : i0 + b1], img_lens[i0 : i0 + b1], cap_blk, lens_blk)
                out[i0 : i0 + b1, idx] = scores.to(out.dtype)
                if progress is not None:
                    progress(scores.numel())
            start += b2
        return out
