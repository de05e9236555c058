"""Small tensor functions shared by encoders, heads and poolings (each written once; the masked
mean of a set is :class:`itm.models.pooling.AvgPool`).

``l2n(x) = x / (||x||_2 + 1e-8)`` (the eps is added to the norm); masks are bool, True = valid.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["L2_EPS", "l2n", "lengths_to_mask"]

#: ``l2n(x) = x / (||x|| + L2_EPS)``
L2_EPS = 1e-8


def l2n(x: Tensor, dim: int = -1) -> Tensor:
    """``x / (||x||_2 + 1e-8)`` along ``dim``.

    The gradient stays finite for an all-zero vector (its norm's square root is taken of 1
    there, which leaves the value ``0 / (1 + eps) = 0`` unchanged)."""
    ss = (x * x).sum(dim=dim, keepdim=True)
    return x / (torch.sqrt(torch.where(ss > 0, ss, torch.ones_like(ss))) + L2_EPS)


def loss_precision(x: Tensor) -> Tensor:
    """``x`` in float32 when it came out of bf16 / fp16 autocast, else unchanged (float64 stays
    float64): the loss and the recall run in at least single precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def lengths_to_mask(lengths: Tensor, size: int) -> Tensor:
    """``lengths [B]`` -> bool mask ``[B, size]`` (True for the first ``lengths[b]`` slots)."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]
