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

from itm.models.align.base import AlignHead, Workspace


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
        """(images, captions) per block so that the head's workspace fits ``max_block_mb``.

        Up to :attr:`max_caption_block` captions per block; the images of a block are balanced
        (``n_img`` split into equal parts, none larger than the budget allows).
        """
        per_pair = max(1, self.align.bytes_per_pair(n_regions, n_words, elem_size))
        pairs = max(1, int(max_block_mb * 2**20) // per_pair)
        n_cap_block = max(1, min(self.max_caption_block, pairs))
        n_img_block = max(1, min(n_img, pairs // n_cap_block))
        n_parts = -(-n_img // n_img_block)
        return -(-n_img // n_parts), n_cap_block

    #: captions per block (CPU favours 64-128; larger blocks only grow the workspace)
    max_caption_block: int = 128

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

        The evaluation engine (methods.md section 3, cost note): captions are sorted by length
        and each block is padded only to its own longest caption; per block, the head's
        inference path (:meth:`~itm.models.align.base.AlignHead.score_block`) computes all
        region-word scores with one matrix product into a reused workspace and works in place
        from there. Padded regions / words are zeroed before scoring (any finite padding gives
        the same result). Block sizes come from the head's workspace estimate and
        ``max_block_mb``, so peak memory does not grow with the number of images or captions
        (beyond the inputs, the output and small per-image quantities such as Gram matrices).
        Scores are independent per pair, so the result equals ``self(...)``.

        Args:
            progress: optional callback receiving the number of pairs scored by each block.
        """
        check_inputs(img, img_lens, cap, cap_lens)
        n_img, n_cap = img.shape[0], cap.shape[0]
        out = img.new_empty(n_img, n_cap)
        if n_img == 0 or n_cap == 0:
            return out
        align, pooling = self.align, self.pooling
        order = torch.argsort(cap_lens, descending=True, stable=True)
        sorted_lens = cap_lens[order]
        k_max = int(img_lens.max())
        img = img[:, :k_max]
        img_mask = lengths_to_mask(img_lens, k_max)
        img_padded = bool((img_lens < k_max).any())
        # per-image quantities (Gram matrices, norms: O(N K^2)), computed in chunks
        img_cache = _cat_caches(
            align.prepare_images(*_zero_pad(img[i : i + 1024], img_mask[i : i + 1024]))
            for i in range(0, n_img, 1024)
        )
        ws = Workspace()
        start = n_cap_blocks = 0
        while start < n_cap:
            n_words = int(sorted_lens[start])  # longest caption of this block (sorted)
            b1, b2 = self.block_sizes(k_max, n_words, img.element_size(), max_block_mb, n_img)
            idx = order[start : start + b2]
            cap_mask = lengths_to_mask(cap_lens[idx], n_words)
            cap_blk, _ = _zero_pad(torch.index_select(cap[:, :n_words], 0, idx), cap_mask, True)
            cap_cache = align.prepare_captions(cap_blk, cap_mask)
            # serpentine over the image blocks (reversed on every other caption block): the
            # first image block of a caption block is the last of the previous one, so the
            # per-image-block tensors of Workspace.memo are reused across that boundary
            starts = range(0, n_img, b1)
            n_cap_blocks += 1
            for i0 in starts if n_cap_blocks % 2 else reversed(starts):
                i1 = min(n_img, i0 + b1)
                img_blk, mask_blk = img[i0:i1], img_mask[i0:i1]
                if img_padded:
                    img_blk, _ = _zero_pad(img_blk, mask_blk)
                ws.image_block = (i0, i1)
                scores = align.score_block(
                    img_blk,
                    mask_blk,
                    cap_blk,
                    cap_mask,
                    pooling,
                    {k: v[i0:i1] for k, v in img_cache.items()},
                    cap_cache,
                    ws,
                )
                out[i0:i1, idx] = scores.to(out.dtype)
                if progress is not None:
                    progress(scores.numel())
            start += b2
        return out


def _zero_pad(x: Tensor, mask: Tensor, copied: bool = False) -> tuple[Tensor, Tensor]:
    """``x [B, N, d]`` with the slots outside ``mask [B, N]`` set to 0 (a copy unless
    ``copied``, i.e. ``x`` is already a private copy)."""
    if bool(mask.all()):
        return x, mask
    if not copied:
        x = x.clone()
    rows = torch.nonzero(~mask.reshape(-1)).flatten()
    x.view(-1, x.shape[-1]).index_fill_(0, rows, 0.0)
    return x, mask


def _cat_caches(parts) -> dict[str, Tensor]:
    parts = list(parts)
    if not parts or not parts[0]:
        return {}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
