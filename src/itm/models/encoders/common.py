"""Helpers shared by the encoders."""

from __future__ import annotations

import torch
from torch import Tensor

L2_EPS = 1e-8


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """``x / (||x||_2 + 1e-8)`` along ``dim`` (methods.md notation ``l2n``)."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + L2_EPS)
