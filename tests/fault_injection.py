"""Fault injection for the resume tests: a callback that kills its own process with SIGKILL
(no cleanup, no exception handlers, exactly like the OOM killer or a preempted node).

Used from the CLI as ``+callbacks.fault._target_=fault_injection.SigkillAt
+callbacks.fault.step=N`` with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SigkillAt(Callback):
    """SIGKILL this process at the start of training batch ``step`` (global step)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
