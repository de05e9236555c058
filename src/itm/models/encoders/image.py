"""Encoders of precomputed region features (docs/foundations.md, "Feature encoders")."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from itm.models.encoders.augment import drop_regions
from itm.models.functional import l2n


class FCImageEncoder(nn.Module):
    """``fc``: one Linear per region, then l2-normalised (SCAN, BFAN, IMRAM, CHAN).

    ``forward(images [B, K, img_dim], lengths [B]) -> [B, K, embed_size]``; padded regions are
    transformed like any other (the heads mask them). With ``region_drop > 0`` and the module in
    training mode, regions are first dropped (:func:`~itm.models.encoders.augment.drop_regions`)
    and the result is ``(emb [B, K', embed_size], new_lengths [B])``.

    Args:
        img_dim: region feature size (2048 for bottom-up features; set from the data).
        embed_size: joint embedding size d.
        norm: l2-normalise each region embedding (VSE-infinity recipes set it false).
        region_drop: probability of dropping each region in training (size augmentation, 0.2
            in the CHAN / VSE-infinity recipes; 0 = off).
    """

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset({"region_drop"})

    def __init__(
        self,
        img_dim: int = 2048,
        embed_size: int = 1024,
        norm: bool = True,
        region_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= region_drop < 1.0:
            raise ValueError(f"region_drop must lie in [0, 1), got {region_drop}")
        self.img_dim, self.embed_size, self.norm = img_dim, embed_size, norm
        self.region_drop = float(region_drop)
        self.fc = nn.Linear(img_dim, embed_size)
        bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)  # Xavier uniform, as SCAN
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def embed(self, images: Tensor, lengths: Tensor) -> Tensor:
        """Un-normalised region embeddings ``[B, K, embed_size]``."""
        return self.fc(images)

    def forward(self, images: Tensor, lengths: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        augment = self.training and self.region_drop > 0
        if augment:
            images, lengths = drop_regions(images, lengths, self.region_drop)
        x = self.embed(images, lengths)
        x = l2n(x) if self.norm else x
        return (x, lengths) if augment else x


class MLPImageEncoder(FCImageEncoder):
    """``mlp`` (VSE-infinity, "fc + residual MLP"): ``x = fc(v) + mlp(v)``, then l2-normalised.

    ``mlp`` = Linear(img_dim, d/2), BatchNorm1d(d/2), ReLU, Linear(d/2, d). The MLP runs on the
    packed VALID regions only, so the BatchNorm batch statistics (training) ignore padded slots
    (the reference computes them over padded rows too; this is the better choice and may differ
    slightly). Padded slots get ``fc(v)`` alone (finite, never used by the heads).

    Args: as :class:`FCImageEncoder`.
    """

    def __init__(
        self,
        img_dim: int = 2048,
        embed_size: int = 1024,
        norm: bool = True,
        region_drop: float = 0.0,
    ) -> None:
        super().__init__(img_dim, embed_size, norm, region_drop)
        hidden = embed_size // 2
        self.mlp = nn.Sequential(
            nn.Linear(img_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, embed_size),
        )

    def embed(self, images: Tensor, lengths: Tensor) -> Tensor:
        x = self.fc(images)
        pos = torch.arange(images.shape[1], device=images.device)
        valid = pos[None, :] < lengths.to(images.device)[:, None]
        residual = self.mlp(images[valid])  # [n_valid, embed_size]
        return x.index_put((valid,), x[valid] + residual)
