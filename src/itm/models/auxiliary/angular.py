"""SAEM's angular loss (Wu et al., ACM MM 2019; the angular loss of Wang et al., ICCV 2017),
docs/saem.md: ``model/aux=angular``.

For an anchor ``a``, its positive ``p`` and a negative ``n`` (unit vectors), with
``tb = tan^2(alpha)`` (``angle_bound``):

    f(a, p, n) = 4 tb (a + p) . n - 2 (1 + tb) a . p

The loss pushes ``n`` out of the cone around ``a`` and ``p``. SAEM uses each image as an anchor
with its caption as the positive and every other caption of the batch as a negative (other
captions of the same image included), keeps the hardest negative and adds
``log(1 + exp(f))``; the same with captions as anchors and images as negatives is added.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from itm.models.auxiliary.base import AuxLoss

__all__ = ["AngularLoss"]


class AngularLoss(AuxLoss):
    """``aux(img_vec [B, d], cap_vec [B, d]) -> scalar``: image- and caption-anchored angular
    losses, summed over the batch (pairs i <-> i; unweighted; inputs are unit vectors).

    With ``max_violation`` each anchor's term is ``log(1 + exp(max_j f_ij))`` (the authors');
    without it, ``log(1 + sum_j exp(f_ij))`` over all its negatives (the N-pair form of the
    angular loss). A batch of one pair has no negative and gives 0.

    ``weight_at(epoch) = weight * decay ** (epoch // decay_every)`` for ``epoch <= last_epoch``,
    else 0 (the authors' schedule: 0.5 in epochs 0-4, 0.05 in 5-9, ..., 5e-5 in epoch 20, 0 from
    epoch 21).

    Args:
        weight: weight of epochs 0 .. decay_every - 1 (0.5).
        decay: factor applied every ``decay_every`` epochs (0.1).
        decay_every: epochs between decays (5).
        last_epoch: the last epoch with a non-zero weight (20).
        angle_bound: ``tan^2`` of the angle bound (1.0, i.e. 45 degrees).
        max_violation: hardest negative only (true) or all negatives (false).
    """

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset(
        {"decay", "decay_every", "last_epoch"}
    )

    inputs = "global"

    def __init__(
        self,
        weight: float = 0.5,
        decay: float = 0.1,
        decay_every: int = 5,
        last_epoch: int = 20,
        angle_bound: float = 1.0,
        max_violation: bool = True,
    ) -> None:
        super().__init__(weight)
        if decay_every < 1:
            raise ValueError(f"decay_every must be >= 1, got {decay_every}")
        self.decay, self.decay_every = float(decay), int(decay_every)
        self.last_epoch, self.angle_bound = int(last_epoch), float(angle_bound)
        self.max_violation = bool(max_violation)

    def weight_at(self, epoch: int) -> float:
        if epoch > self.last_epoch:
            return 0.0
        return self.weight * self.decay ** (epoch // self.decay_every)

    def anchored(self, anchor: Tensor, positive: Tensor) -> Tensor:
        """The loss with ``anchor [B, d]`` rows as anchors, ``positive [B, d]`` row i as the
        positive of anchor i and the other rows of ``positive`` as its negatives (a sum)."""
        b = anchor.shape[0]
        if b < 2:
            return anchor.new_zeros(())
        tb = self.angle_bound
        f = 4 * tb * (anchor + positive) @ positive.T  # [B, B]: (a_i + p_i) . p_j
        f = f - 2 * (1 + tb) * (anchor * positive).sum(dim=1, keepdim=True)
        eye = torch.eye(b, dtype=torch.bool, device=f.device)
        f = f.masked_fill(eye, float("-inf"))  # j != i
        hardest = f.amax(dim=1) if self.max_violation else torch.logsumexp(f, dim=1)
        return torch.logaddexp(hardest.new_zeros(()), hardest).sum()  # log(1 + exp(.)), stable

    def forward(self, img_vec: Tensor, cap_vec: Tensor) -> Tensor:
        return self.anchored(img_vec, cap_vec) + self.anchored(cap_vec, img_vec)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, decay={self.decay}, decay_every={self.decay_every}, "
            f"last_epoch={self.last_epoch}, angle_bound={self.angle_bound}, "
            f"max_violation={self.max_violation}"
        )
