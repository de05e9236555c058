"""PFAN's position-focused image encoder (Wang et al., IJCAI 2019; docs/pfan.md).

Each region comes with ``T`` grid blocks of a ``G x G`` grid and the share of its box in each
(the position rows of :func:`itm.data.pfan_positions`). The region attends over its blocks' learned
embeddings, and the attended position vector joins the region feature before the projection:

    e_l   = pos_embed[idx_l]                       (l = 1..T; Embedding(G^2 + 1, pos_dim))
    a     = softmax_l(tanh(fc_att(v) . e_l))      (fc_att on the RAW region feature)
    beta  = softmax_l(omega_l * a_l)              (a second softmax, over weight x attention)
    p     = sum_l beta_l e_l
    x     = l2n(fc([v ; p]))

Padding slots of a region (index ``G^2``, weight 0) are ordinary slots in both softmaxes, as in
the authors' code: they enter with product 0. Because the second softmax acts on products <= 1,
the block weights stay close to uniform; p is close to the mean of the block embeddings.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.models.encoders.augment import drop_region_rows
from itm.models.functional import l2n


class PFANImageEncoder(nn.Module):
    """``pfan``: region features plus attended grid-block embeddings, projected, l2-normalised.

    ``forward(images [B, K, img_dim], lengths [B], positions=P [B, K, >= 2T]) -> [B, K, d]``.
    ``P`` holds ``T`` block indices (floats, read by truncation to int) and then ``T`` overlap
    weights; further columns (the COCO files' area) are ignored. Only VALID regions (before each
    length) are read: padded regions may hold anything, out-of-range indices included, and get
    ``fc([v ; 0])`` (finite, never used by the heads). With ``region_drop > 0`` in training,
    regions are dropped and the SAME rows of ``P`` with them, and the result is
    ``(emb [B, K', d], new_lengths [B])``.

    Args:
        img_dim: region feature size (2048 for bottom-up features; set from the data).
        embed_size: joint embedding size d.
        grid: grid size G (16): block indices run 0..G^2 - 1, G^2 is the padding block.
        top_blocks: blocks per region T (15).
        pos_dim: size of the block embeddings (200).
        norm: l2-normalise each region embedding.
        region_drop: probability of dropping each region in training (0 = off).

    Parameters (the authors' state_dict names in brackets): ``fc`` Linear(img_dim + pos_dim,
    d), Xavier-uniform over both fan-ins, zero bias [``fc``]; ``fc_att`` Linear(img_dim,
    pos_dim), torch's default init [``fc_att``]; ``pos_embed`` Embedding(G^2 + 1, pos_dim),
    N(0, 1) [``position_embedding``].
    """

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset({"region_drop"})

    #: per-region inputs this encoder reads besides the features (the datamodule serves them
    #: and the LightningModule passes them as keyword arguments)
    extra_inputs: tuple[str, ...] = ("positions",)

    def __init__(
        self,
        img_dim: int = 2048,
        embed_size: int = 1024,
        grid: int = 16,
        top_blocks: int = 15,
        pos_dim: int = 200,
        norm: bool = True,
        region_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= region_drop < 1.0:
            raise ValueError(f"region_drop must lie in [0, 1), got {region_drop}")
        if grid < 1 or top_blocks < 1 or pos_dim < 1:
            raise ValueError(
                f"grid, top_blocks and pos_dim must be >= 1, got {grid}, {top_blocks}, {pos_dim}"
            )
        self.img_dim, self.embed_size, self.norm = img_dim, embed_size, norm
        self.grid, self.top_blocks, self.pos_dim = grid, top_blocks, pos_dim
        self.region_drop = float(region_drop)
        self.fc = nn.Linear(img_dim + pos_dim, embed_size)
        bound = math.sqrt(6.0) / math.sqrt(img_dim + pos_dim + embed_size)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)
        self.fc_att = nn.Linear(img_dim, pos_dim)
        self.pos_embed = nn.Embedding(grid * grid + 1, pos_dim)  # N(0, 1) init

    def example_inputs(self, lengths: Tensor, n_regions: int, seed: int = 0) -> dict[str, Tensor]:
        """Keyword inputs for a batch of ``len(lengths)`` images of ``n_regions`` slots (tests,
        conformance): ``{"positions": [B, K, 2T]}`` with valid rows of random blocks (some
        padding slots) and normalised weights, and padded regions holding out-of-range garbage
        that must never be read."""
        g = torch.Generator().manual_seed(seed)
        b, t, dtype = len(lengths), self.top_blocks, self.fc.weight.dtype
        idx = torch.randint(0, self.grid**2 + 1, (b, n_regions, t), generator=g).to(dtype)
        w = torch.rand(b, n_regions, t, generator=g, dtype=dtype)
        w = w / w.sum(dim=-1, keepdim=True)
        pos = torch.cat([idx, w], dim=-1)
        pad = torch.arange(n_regions)[None, :] >= torch.as_tensor(lengths).cpu()[:, None]
        pos[pad] = 1e6  # garbage: an index far out of range
        return {"positions": pos.to(self.fc.weight.device)}

    def _valid_rows(
        self, images: Tensor, lengths: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``valid [B, K]`` and, for the valid regions only, ``v [n, img_dim]``,
        ``idx [n, T]`` (int64, range-checked) and ``omega [n, T]``."""
        t = self.top_blocks
        if positions.dim() != 3 or positions.shape[:2] != images.shape[:2]:
            raise ValueError(
                f"positions must be [B, K, >= {2 * t}] matching images {tuple(images.shape)}, "
                f"got {tuple(positions.shape)}"
            )
        if positions.shape[2] < 2 * t:
            raise ValueError(
                f"positions have {positions.shape[2]} columns; top_blocks={t} needs at least "
                f"{2 * t} ({t} block indices, then {t} weights)"
            )
        k = images.shape[1]
        valid = torch.arange(k, device=images.device)[None, :] < lengths.to(images.device)[:, None]
        rows = positions[valid]  # [n, W] valid regions only: padded ones are never looked up
        idx = rows[:, :t].long()  # truncation, as the authors' int()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > self.grid**2):
            raise ValueError(
                f"position block indices must lie in 0..{self.grid**2} (grid {self.grid}: "
                f"{self.grid**2} = padding), got {int(idx.min())}..{int(idx.max())} in valid "
                "regions"
            )
        return valid, images[valid], idx, rows[:, t : 2 * t].to(images.dtype)

    def block_attention(
        self, images: Tensor, lengths: Tensor, positions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The two softmaxes of every region: ``(a [B, K, T], beta [B, K, T])`` (zeros at padded
        regions). ``a`` = softmax of tanh(fc_att(v) . e_l); ``beta`` = softmax of omega_l a_l."""
        valid, v, idx, omega = self._valid_rows(images, lengths, positions)
        a, beta, _ = self._attend(v, idx, omega)
        shape = (*images.shape[:2], self.top_blocks)
        out_a = images.new_zeros(shape).index_put((valid,), a)
        out_b = images.new_zeros(shape).index_put((valid,), beta)
        return out_a, out_b

    def _attend(self, v: Tensor, idx: Tensor, omega: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``v [n, img_dim]``, ``idx`` / ``omega [n, T]`` -> ``a``, ``beta [n, T]``,
        position feature ``p [n, pos_dim]``."""
        e = self.pos_embed(idx)  # [n, T, pos_dim]
        q = self.fc_att(v)  # [n, pos_dim]
        a = F.softmax(torch.tanh(torch.bmm(e, q.unsqueeze(2)).squeeze(2)), dim=1)  # [n, T]
        beta = F.softmax(omega * a, dim=1)  # [n, T]
        p = torch.bmm(beta.unsqueeze(1), e).squeeze(1)  # [n, pos_dim]
        return a, beta, p

    def forward(
        self, images: Tensor, lengths: Tensor, positions: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        if positions is None:
            raise ValueError(
                "the pfan image encoder needs positions=P [B, K, >= 2 top_blocks] (PFAN position "
                "rows: block indices, then weights); the data serves them as batch['positions']"
            )
        augment = self.training and self.region_drop > 0
        if augment:
            (images, positions), lengths = drop_region_rows(
                (images, positions), lengths, self.region_drop
            )
        valid, v, idx, omega = self._valid_rows(images, lengths, positions)
        _, _, p = self._attend(v, idx, omega)
        p_all = images.new_zeros((*images.shape[:2], self.pos_dim)).index_put((valid,), p)
        x = self.fc(torch.cat([images, p_all], dim=-1))
        x = l2n(x) if self.norm else x
        return (x, lengths) if augment else x


__all__ = ["PFANImageEncoder"]
