"""Pooling over a masked set axis (methods.md section 7).

Every pooling module maps ``x [..., N, D]`` with ``mask [..., N]`` (True = valid item; the mask
only needs to broadcast against ``x.shape[:-1]``) to ``[..., D]``. Values at invalid positions may
be arbitrary finite numbers: they never reach the result, nor its gradient. A set of scalar
fragment scores is the case ``D = 1`` (see :func:`pool_scores`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AvgPool", "LSEPool", "MaxPool", "SetPooling", "SumPool", "pool_scores"]


class SetPooling(nn.Module):
    """Base class: ``forward(x [..., N, D], mask [..., N]) -> [..., D]``."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _valid(x: Tensor, mask: Tensor) -> Tensor:
    """``mask`` broadcast to ``x`` with a trailing unit axis: ``[..., N, 1]`` (bool)."""
    return mask.unsqueeze(-1).expand(*x.shape[:-1], 1)


class AvgPool(SetPooling):
    """Mean over the valid items."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        valid = _valid(x, mask)
        total = torch.where(valid, x, x.new_zeros(())).sum(dim=-2)
        count = valid.sum(dim=-2).clamp_min(1).to(x.dtype)
        return total / count


class SumPool(SetPooling):
    """Sum over the valid items."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return torch.where(_valid(x, mask), x, x.new_zeros(())).sum(dim=-2)


class MaxPool(SetPooling):
    """Maximum over the valid items."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return torch.where(_valid(x, mask), x, x.new_full((), float("-inf"))).amax(dim=-2)


class LSEPool(SetPooling):
    """Log-sum-exp pooling ``(1/lambda) log sum_n exp(lambda x_n)`` over the valid items.

    Computed with a max shift, so large ``lambda * x`` does not overflow. ``rescale=False`` drops
    the ``1/lambda`` factor (CHAN's released recipe: ``log sum exp(x / 0.1)``).

    Args:
        lambda_lse: temperature lambda (SCAN: 6 for t2i, 5 / 20 for i2t; CHAN: 10).
        rescale: multiply by ``1/lambda`` (SCAN) or not (CHAN).
    """

    def __init__(self, lambda_lse: float = 6.0, rescale: bool = True) -> None:
        super().__init__()
        self.lambda_lse = float(lambda_lse)
        self.rescale = bool(rescale)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        valid = _valid(x, mask)
        z = torch.where(valid, x * self.lambda_lse, x.new_full((), float("-inf")))
        shift = z.amax(dim=-2, keepdim=True).detach()
        # Shifted exponentials of invalid items are exp(-inf) = 0 exactly.
        out = torch.log(torch.exp(z - shift).sum(dim=-2)) + shift.squeeze(-2)
        return out / self.lambda_lse if self.rescale else out

    def extra_repr(self) -> str:
        return f"lambda_lse={self.lambda_lse}, rescale={self.rescale}"


def pool_scores(pooling: nn.Module, scores: Tensor, mask: Tensor) -> Tensor:
    """Pool scalar fragment scores ``scores [..., N]`` with ``mask [..., N]`` -> ``[...]``."""
    return pooling(scores.unsqueeze(-1), mask).squeeze(-1)
