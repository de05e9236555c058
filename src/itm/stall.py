"""Say when training has stalled at the hinge loss's collapse value.

With hardest negatives from the first step (the SCAN paper's recipe, ``model.warmup_epochs=0``),
a model can fall into the state where every image-caption score is equal and stay there: the
loss of a batch of ``n`` pairs is then pinned at its collapse value ``2 x margin x n`` (hardest
negatives: every row's and every column's worst hinge is exactly ``margin``), or
``2 x margin x n x (n - 1)`` with the sum over negatives; its gradient gives no direction out,
and dev recall stays at chance. The remedy of the references that train past it (VSE-infinity,
CHAN) is a warm-up of sum-over-negatives epochs, ``model.warmup_epochs=1``.

:class:`StallWarning` (``callbacks.stall_warning``, on by default) watches every training
batch's loss; at the end of an epoch in which at least ``fraction`` of the batches sat at their
collapse value (relative ``tolerance``) it warns ONCE per run, in the log (``WARNING``) and in
the epoch summary line (:class:`itm.callbacks.EpochSummary` shows ``STALLED``), naming
``model.warmup_epochs`` as the remedy. Auxiliary losses and penalties change the loss, so the
check only counts batches of models without them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

__all__ = ["StallWarning", "collapse_loss"]


def collapse_loss(margin: float, n: int, hardest: bool) -> float:
    """The batch-summed hinge loss when every score of an ``n x n`` batch is equal."""
    return 2.0 * margin * n * (1 if hardest else n - 1)


class StallWarning(Callback):
    """Warn once when an epoch's training losses sit at the collapse value (see the module
    docstring).

    Args:
        tolerance: relative distance to the collapse value that counts as "at" it.
        fraction: share of an epoch's batches (with a known collapse value) that must be at it.
        min_batches: epochs with fewer checked batches are not judged.

    Attributes:
        message: the warning, once given (``None`` before); ``stalled_epoch``: its epoch.
    """

    def __init__(self, tolerance: float = 1e-3, fraction: float = 0.9, min_batches: int = 1):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"stall_warning.fraction must lie in (0, 1], got {fraction}")
        self.tolerance, self.fraction, self.min_batches = float(tolerance), fraction, min_batches
        self.message: str | None = None
        self.stalled_epoch: int | None = None
        self._at = self._seen = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._at = self._seen = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        criterion = getattr(pl_module, "criterion", None)
        if criterion is None or getattr(pl_module, "aux", None) is not None:
            return
        if float(getattr(pl_module, "weight_norm_coef", 0.0) or 0.0) > 0:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not hasattr(batch, "get") or batch.get("images") is None:
            return
        n = int(batch["images"].shape[0])
        if n < 2:
            return
        hardest = bool(criterion.max_violation) and trainer.current_epoch >= int(
            getattr(pl_module, "warmup_epochs", 0)
        )
        target = collapse_loss(float(criterion.margin), n, hardest)
        value = float(loss.detach())
        self._seen += 1
        if math.isfinite(value) and abs(value - target) <= self.tolerance * target:
            self._at += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.message is not None or self._seen < self.min_batches:
            return
        if self._at < self.fraction * self._seen:
            return
        margin = float(getattr(pl_module.criterion, "margin", 0.0))
        warmup = int(getattr(pl_module, "warmup_epochs", 0))
        self.stalled_epoch = trainer.current_epoch
        self.message = (
            f"training has stalled: in epoch {trainer.current_epoch + 1}, {self._at} of "
            f"{self._seen} batches had the loss 2 x margin ({margin:g}) x batch size, the value "
            "when every image-caption score is equal (collapsed embeddings; dev recall stays "
            f"at chance). Hardest negatives from the first step (model.warmup_epochs={warmup}) "
            "can stay there: restart with model.warmup_epochs=1 (one epoch of "
            "sum-over-negatives loss first), or a lower lr"
        )
        if trainer.is_global_zero:
            log.warning(self.message)
