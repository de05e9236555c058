"""VSRN's region-relationship reasoning (Li et al., "Visual Semantic Reasoning for Image-Text
Matching", ICCV 2019), docs/vsrn.md: ``model/image_encoder=gcn``.

Regions are embedded by a Linear layer, then ``gcn_layers`` residual graph-reasoning layers
relate every region to every other one of the same image through a K x K affinity matrix
(no softmax: the raw products divided by K). The output V* is normalised like the authors'
``l2norm``, which on a ``[B, K, d]`` tensor runs over the REGION axis: each feature channel of
an image has unit norm over its regions (see :func:`region_l2norm`). The ``gru_last`` pooling
(:class:`~itm.models.pooling.GRULastPool`) then reads V* region by region into one vector.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from itm.models.encoders.augment import drop_regions
from itm.models.functional import L2_EPS, l2n, lengths_to_mask

__all__ = ["GCNImageEncoder", "GCNLayer", "batch_norm_valid", "region_l2norm"]

NORM_OVER = ("regions", "features")


def region_l2norm(x: Tensor, mask: Tensor) -> Tensor:
    """VSRN's ``l2norm`` of a region set: ``x [B, K, d]`` divided, per image and channel, by the
    channel's l2 norm over the image's valid regions (``mask [B, K]``) plus 1e-8.

    The region vectors of the result are NOT unit vectors (their mean squared norm is d / K).
    The authors' function has no eps; the added 1e-8 moves results by about 1e-8. Padded slots
    are 0 in the result.
    """
    x = x.masked_fill(~mask[..., None], 0.0)
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + L2_EPS)


def batch_norm_valid(bn: nn.BatchNorm1d, x: Tensor, mask: Tensor) -> Tensor:
    """``bn`` applied per item of ``x [B, N, C]``, with training statistics over the VALID items.

    In training mode the batch statistics (and the running-statistics update) come from the
    items where ``mask [B, N]`` is True only, so padded slots never move them; padded slots are
    0 in the result. In eval mode BatchNorm is an elementwise map and runs on every slot.
    """
    b, n, c = x.shape
    if not bn.training or bool(mask.all()):
        return bn(x.reshape(b * n, c)).reshape(b, n, c)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    flat = x.reshape(b * n, c)
    normed = bn(flat.index_select(0, rows))  # [n_valid, C], statistics of the valid items
    return flat.new_zeros(b * n, c).index_copy(0, rows, normed).reshape(b, n, c)


class GCNLayer(nn.Module):
    """One reasoning layer (the authors' ``Rs_GCN``): ``x + BN(out(R g(x)))`` with
    ``R = theta(x) phi(x)^T / K``.

    ``theta``, ``phi``, ``g`` and ``out`` are Linear(d, d) with bias (the authors' 1x1 Conv1d:
    weight ``[d, d, 1]`` without its last axis; same default initialisation); ``bn`` is
    BatchNorm1d(d) with weight and bias initialised to 0, so that the layer starts as the
    identity.

    ``forward(x [B, K, d], mask [B, K], count [B, 1, 1]) -> [B, K, d]``: the affinity of region
    i with region j is summed over the VALID regions j only and divided by the number of valid
    regions ``count``; BatchNorm takes its training statistics over the valid regions of the
    batch. Padded slots of the result are finite and unused.
    """

    def __init__(self, embed_size: int) -> None:
        super().__init__()
        d = embed_size
        self.g, self.theta, self.phi, self.out = (nn.Linear(d, d) for _ in range(4))
        self.bn = nn.BatchNorm1d(d)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor, mask: Tensor, count: Tensor) -> Tensor:
        g = self.g(x).masked_fill(~mask[..., None], 0.0)  # padded regions j contribute nothing
        affinity = torch.bmm(self.theta(x), self.phi(x).transpose(1, 2)) / count  # [B, K, K]
        y = torch.bmm(affinity, g)  # [B, K, d]
        return x + batch_norm_valid(self.bn, self.out(y), mask)


class GCNImageEncoder(nn.Module):
    """``gcn``: Linear -> (pre-norm) -> ``gcn_layers`` x :class:`GCNLayer` -> norm = V*.

    ``forward(images [B, K, img_dim], lengths [B]) -> V* [B, K, embed_size]`` (padded slots 0).
    With ``region_drop > 0`` in training the regions are first dropped
    (:func:`~itm.models.encoders.augment.drop_regions`) and the result is ``(V*, new_lengths)``
    (VSRN's recipes use none: the ``gru_last`` pooling reads regions in order).

    Args:
        img_dim: region feature size (set from the data).
        embed_size: joint embedding size d (VSRN: 2048).
        gcn_layers: number of reasoning layers (4), each with its own weights.
        pre_norm: normalise the Linear's output before the first layer (the authors' COCO
            model; their F30K model has no pre-norm: the recipes set it).
        norm: normalise the output V*.
        norm_over: ``regions`` = the authors' ``l2norm`` over the region axis
            (:func:`region_l2norm`); ``features`` = per-region l2 norm (an ablation; the paper's
            wording suggests it, the code does not). Applies to the pre-norm and to V*.
        region_drop: probability of dropping each region in training (0 = off).
    """

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset({"region_drop"})

    def __init__(
        self,
        img_dim: int = 2048,
        embed_size: int = 2048,
        gcn_layers: int = 4,
        pre_norm: bool = True,
        norm: bool = True,
        norm_over: str = "regions",
        region_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if norm_over not in NORM_OVER:
            raise ValueError(f"norm_over must be one of {NORM_OVER}, got {norm_over!r}")
        if gcn_layers < 0:
            raise ValueError(f"gcn_layers must be >= 0, got {gcn_layers}")
        if not 0.0 <= region_drop < 1.0:
            raise ValueError(f"region_drop must lie in [0, 1), got {region_drop}")
        self.img_dim, self.embed_size = img_dim, embed_size
        self.pre_norm, self.norm, self.norm_over = bool(pre_norm), bool(norm), norm_over
        self.region_drop = float(region_drop)
        self.fc = nn.Linear(img_dim, embed_size)
        bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)  # Xavier uniform, zero bias
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)
        self.gcn = nn.ModuleList(GCNLayer(embed_size) for _ in range(gcn_layers))

    def _normalise(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.norm_over == "regions":
            return region_l2norm(x, mask)
        return l2n(x).masked_fill(~mask[..., None], 0.0)

    def forward(self, images: Tensor, lengths: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        augment = self.training and self.region_drop > 0
        if augment:
            images, lengths = drop_regions(images, lengths, self.region_drop)
        mask = lengths_to_mask(lengths.to(images.device), images.shape[1])
        # zeroed padding: garbage, however large, cannot reach a valid region through R
        x = self.fc(images.masked_fill(~mask[..., None], 0.0))
        if self.pre_norm:
            x = self._normalise(x, mask)
        count = lengths.to(device=x.device, dtype=x.dtype).clamp_min(1)[:, None, None]
        for layer in self.gcn:
            x = layer(x, mask, count)
        x = self._normalise(x, mask) if self.norm else x
        return (x, lengths) if augment else x

    def extra_repr(self) -> str:
        return f"pre_norm={self.pre_norm}, norm={self.norm}, norm_over={self.norm_over!r}"
