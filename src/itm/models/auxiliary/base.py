"""The auxiliary-loss slot of the LightningModule (``model/aux``).

An auxiliary loss is an extra training objective added to the matching loss::

    loss = contrastive(sims) + aux.weight_at(epoch) * aux(...)

``inputs`` says what the LightningModule passes to it:

- ``"fragments"``: ``aux(img [B, K, d], img_lens [B], tokens [B, L], cap_lens [B])``, the image
  encoder's output and the batch's caption token ids (VSRN's caption generation);
- ``"global"``: ``aux(img_vec [B, d], cap_vec [B, d])``, the l2-normalised global vectors of the
  ``global`` head (SAEM's angular loss).

Pairs are (image i, caption i) of the training batch. The loss is returned unweighted; the
module multiplies it by ``weight_at(current_epoch)`` (an epoch of weight 0 skips it).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

__all__ = ["AUX_INPUTS", "AuxLoss"]

AUX_INPUTS = ("fragments", "global")


class AuxLoss(nn.Module):
    """Base class of the ``model/aux`` losses (see the module docstring)."""

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset({"weight"})

    #: what the LightningModule passes to :meth:`forward`: ``"fragments"`` or ``"global"``.
    inputs: str = "fragments"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def weight_at(self, epoch: int) -> float:
        """The loss weight in ``epoch`` (0-based); constant ``weight`` unless overridden."""
        return self.weight
