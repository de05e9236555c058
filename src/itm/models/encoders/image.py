"""Encoders of precomputed region features (methods.md section 1)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from itm.models.encoders.common import l2norm


class FCImageEncoder(nn.Module):
    """``fc``: one Linear per region, then l2-normalised (SCAN, BFAN, IMRAM, CHAN).

    ``forward(images [B, K, img_dim], lengths [B]) -> [B, K, embed_size]``; padded regions are
    transformed like any other (the heads mask them).

    Args:
        img_dim: region feature size (2048 for bottom-up features; set from the data).
        embed_size: joint embedding size d.
        norm: l2-normalise each region embedding (VSE-infinity recipes set it false).
    """

    def __init__(self, img_dim: int = 2048, embed_size: int = 1024, norm: bool = True) -> None:
        super().__init__()
        self.img_dim, self.embed_size, self.norm = img_dim, embed_size, norm
        self.fc = nn.Linear(img_dim, embed_size)
        bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)  # Xavier uniform, as SCAN
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: Tensor, lengths: Tensor) -> Tensor:
        x = self.fc(images)
        return l2norm(x) if self.norm else x
