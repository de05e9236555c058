"""Training callbacks: progress bars (off when not a terminal), epoch summaries, alignment pictures.

- :class:`RichProgress`: Lightning's ``RichProgressBar`` that switches itself off when stdout is
  not a terminal (CI logs, pytest, SLURM output files) unless ``ITM_PROGRESS=1``. It also gives
  the model a progress callback for block-wise evaluation scoring
  (``ITMModule.scoring_progress``), shown as a task of its bar.
- :class:`EpochSummary`: one log line per epoch (epoch-mean loss, lr, dev rsum, training and
  dev time) where no bar is drawn; ``STALLED`` in the epoch :class:`itm.stall.StallWarning`
  found the loss at its collapse value.
- :class:`EpochClock`: wall time of a training epoch with its validation taken out (the model
  logs ``train/epoch_time_s`` and ``train/samples_per_s`` from it).
- :class:`AlignmentImages`: after each validation, logs region-word attention pictures of a few
  fixed dev pairs to every logger that can log images (W&B).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar

log = logging.getLogger(__name__)

__all__ = [
    "AlignmentImages",
    "EpochClock",
    "EpochSummary",
    "RichProgress",
    "no_progress",
    "progress_enabled",
]


def progress_enabled(setting: bool | str | None = "auto") -> bool:
    """Whether to draw progress bars: ``True``/``False``, or ``"auto"`` = stdout is a terminal.

    The environment variable ``ITM_PROGRESS`` (``0``/``1``) overrides ``"auto"``.
    """
    if isinstance(setting, bool):
        return setting
    env = os.environ.get("ITM_PROGRESS")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    stream = sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) and "PYTEST_CURRENT_TEST" not in (
        os.environ
    )


@contextlib.contextmanager
def no_progress(total: int, description: str = "scoring") -> Iterator[None]:
    """A scoring progress that shows nothing (the model's default ``scoring_progress``)."""
    yield None


class RichProgress(RichProgressBar):
    """``RichProgressBar`` that is disabled when not drawing to a terminal, and that shows the
    model's full-matrix scoring as a task of its bar.

    While attached (``setup`` .. ``teardown``) it sets the model's ``scoring_progress`` (when the
    model has one, as :class:`~itm.models.module.ITMModule`) to :meth:`scoring_task`.

    Args:
        enable: ``"auto"`` (default: on only when stdout is a TTY; ``ITM_PROGRESS`` overrides),
            ``True`` or ``False``.
        refresh_rate, leave, **kwargs: see ``lightning.pytorch.callbacks.RichProgressBar``.
    """

    def __init__(
        self, enable: bool | str = "auto", refresh_rate: int = 1, leave: bool = False, **kwargs
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, **kwargs)
        if not progress_enabled(enable):
            self.disable()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if hasattr(pl_module, "scoring_progress"):
            setattr(pl_module, "scoring_progress", self.scoring_task)  # noqa: B010 (nn.Module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if getattr(pl_module, "scoring_progress", None) == self.scoring_task:
            setattr(pl_module, "scoring_progress", no_progress)  # noqa: B010

    @contextlib.contextmanager
    def scoring_task(
        self, total: int, description: str = "scoring"
    ) -> Iterator[Callable[[int], None] | None]:
        """Progress of block-wise scoring (``total`` pairs) as a task of this bar.

        Yields ``progress(n_pairs)`` for ``Similarity.score_matrix(..., progress=...)``, or
        ``None`` when no bar is drawn (no TTY, not rank 0, not started): then it costs nothing.
        """
        progress = self.progress if self.is_enabled else None
        if progress is None:
            yield None
            return
        task = progress.add_task(f"[cyan]{description}", total=max(int(total), 1))

        def advance(n: int) -> None:
            progress.update(task, advance=int(n))
            progress.refresh()

        try:
            yield advance
        finally:
            with contextlib.suppress(Exception):
                progress.remove_task(task)
                progress.refresh()


class EpochClock:
    """Wall time of one training epoch with the validation inside it taken out.

    ``start()`` at the epoch's start, ``pause()`` / ``resume()`` around each validation;
    :attr:`train_seconds` is the time since ``start()`` minus the paused time (so it covers data
    loading, forward, backward and optimizer steps), :attr:`samples` what the caller counted.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._paused = 0.0
        self._pause_start: float | None = None
        self.samples = 0

    def start(self) -> None:
        self._start, self._paused, self._pause_start = time.perf_counter(), 0.0, None
        self.samples = 0

    def pause(self) -> None:
        if self._start is not None and self._pause_start is None:
            self._pause_start = time.perf_counter()

    def resume(self) -> None:
        if self._pause_start is not None:
            self._paused += time.perf_counter() - self._pause_start
            self._pause_start = None

    @property
    def train_seconds(self) -> float:
        if self._start is None:
            return 0.0
        now = self._pause_start if self._pause_start is not None else time.perf_counter()
        return now - self._start - self._paused


class EpochSummary(Callback):
    """One log line per epoch where no progress bar is drawn (``make train | tee log``, CI,
    SLURM logs), so a run written to a file still shows how training goes. Rank 0 only::

        epoch 2/4  loss 51.2  lr 1.0e-03  dev rsum 473.1 (best 473.1)  train 25.1 s (410 pairs/s)  dev 6.2 s

    ``loss``: ``train/loss_epoch``, the batch-summed loss averaged over the epoch's batches
    weighted by their sizes; ``lr``: the first parameter group's; ``dev rsum`` and ``dev``
    (evaluation time) only in epochs that validated; ``train``: the epoch's training time
    without validation (the model's ``epoch_clock``) and its throughput.

    Args:
        enable: ``"auto"`` (default: only when progress bars are off, see
            :func:`progress_enabled`), ``True`` or ``False``.
    """

    def __init__(self, enable: bool | str = "auto") -> None:
        self.enable = enable
        self._validated = False

    def _active(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return False
        return self.enable if isinstance(self.enable, bool) else not progress_enabled("auto")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated = not trainer.sanity_checking

    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """The summary of the epoch that ends (read from the trainer's metrics)."""
        m = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        if "train/loss_epoch" in m:
            parts.append(f"loss {float(m['train/loss_epoch']):.4f}")
        if trainer.optimizers and trainer.optimizers[0].param_groups:
            parts.append(f"lr {float(trainer.optimizers[0].param_groups[0]['lr']):.1e}")
        if self._validated and "dev/rsum" in m:
            rsum = float(m["dev/rsum"])
            # the checkpoint callback's best (it updates after this hook; survives a resume)
            ckpt = trainer.checkpoint_callback
            prev = getattr(ckpt, "best_model_score", None)
            if getattr(ckpt, "monitor", "dev/rsum") != "dev/rsum":  # it holds another figure
                prev = None
            best = rsum if prev is None else max(rsum, float(prev))
            parts.append(f"dev rsum {rsum:.1f} (best {best:.1f})")
        clock = getattr(pl_module, "epoch_clock", None)
        if isinstance(clock, EpochClock):
            seconds = clock.train_seconds
            rate = clock.samples * trainer.world_size / max(seconds, 1e-9)
            parts.append(f"train {seconds:.1f} s ({rate:.0f} pairs/s)")
        if self._validated and "train/dev_time_s" in m:
            parts.append(f"dev {float(m['train/dev_time_s']):.1f} s")
        stalled = _stalled_in(trainer)
        if stalled is not None and stalled == trainer.current_epoch:
            parts.append("STALLED: loss at 2 x margin x batch (raise model.warmup_epochs)")
        return "  ".join(parts)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active(trainer):
            log.info(self.line(trainer, pl_module))


def _stalled_in(trainer: pl.Trainer) -> int | None:
    """The epoch in which :class:`itm.stall.StallWarning` (when configured) found the stall."""
    from itm.stall import StallWarning

    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, StallWarning) and cb.stalled_epoch is not None:
            return cb.stalled_epoch
    return None


@dataclass
class _Example:
    images: torch.Tensor  # [K, D]
    img_len: int
    tokens: torch.Tensor  # [L]
    cap_len: int
    words: list[str]
    boxes: np.ndarray | None
    highlight: list[int | None] | None
    title: str
    image_inputs: dict[str, np.ndarray]  # per-region inputs of the image (PFAN positions)


class AlignmentImages(Callback):
    """Log region-word attention pictures of fixed dev pairs after every validation.

    The pairs are the first caption of each of the first ``n_examples`` images of ``split``
    (fixed across epochs, so the pictures show how alignment develops). Each picture is
    :func:`itm.viz.plot_attention` of :func:`itm.viz.attention_map` (boxes drawn when the split
    has ``boxes``; on synthetic data the planted region of each concept word is outlined).
    Logged under ``<split>/alignment`` to each logger with a ``log_image`` method (W&B); does
    nothing without one. Rank 0 only.

    Args:
        n_examples: pairs shown.
        split: data split to take the pairs from.
        every_n_epochs: log every n validations.
        key: the logged key's suffix.
    """

    def __init__(
        self,
        n_examples: int = 4,
        split: str = "dev",
        every_n_epochs: int = 1,
        key: str = "alignment",
    ) -> None:
        self.n_examples = int(n_examples)
        self.split = split
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.key = key
        self._examples: list[_Example] | None = None
        self._calls = 0

    @staticmethod
    def image_loggers(trainer: pl.Trainer) -> list[Any]:
        return [lg for lg in trainer.loggers if callable(getattr(lg, "log_image", None))]

    def examples(self, trainer: pl.Trainer) -> list[_Example]:
        """The fixed pairs (read once from the datamodule)."""
        if self._examples is not None:
            return self._examples
        from itm.data.datamodule import encode_caption
        from itm.viz import token_labels

        dm = getattr(trainer, "datamodule", None)
        self._examples = []
        if dm is None or not hasattr(dm, "get_split") or self.n_examples <= 0:
            return self._examples
        store = dm.get_split(self.split)
        tokenizer = getattr(dm, "caption_tokenizer", None) or dm.vocab
        cap_to_img = np.asarray(store.cap_to_img)
        boxes = getattr(store, "boxes", None)
        inputs = tuple(getattr(dm, "image_inputs", ()))
        for i in range(min(self.n_examples, len(store.images))):
            hits = np.flatnonzero(cap_to_img == i)
            if hits.size == 0:
                continue
            c = int(hits[0])
            feats = torch.from_numpy(np.array(store.images[i], dtype=np.float32))
            ids = encode_caption(tokenizer, store.captions[c]).tolist()
            words = token_labels(tokenizer, ids)
            self._examples.append(
                _Example(
                    images=feats,
                    img_len=int(feats.shape[0]),
                    tokens=torch.tensor(ids, dtype=torch.int64),
                    cap_len=len(ids),
                    words=words,
                    boxes=None if boxes is None else np.asarray(boxes[i]),
                    highlight=_planted_regions(store, i, c, words),
                    title=f"{self.split} image {i}, caption {c}",
                    image_inputs={n: np.asarray(getattr(store, n)[i]) for n in inputs},
                )
            )
        return self._examples

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loggers = self.image_loggers(trainer)
        if not loggers:
            return
        self._calls += 1
        if (self._calls - 1) % self.every_n_epochs:
            return
        from itm.viz import attention_map, figure_to_array, plot_attention

        pictures, captions = [], []
        for ex in self.examples(trainer):
            att = attention_map(
                pl_module,
                ex.images,
                ex.img_len,
                ex.tokens,
                ex.cap_len,
                image_inputs=ex.image_inputs,
            )
            fig = plot_attention(
                att, ex.words, boxes=ex.boxes, highlight=ex.highlight, title=ex.title
            )
            pictures.append(figure_to_array(fig))
            captions.append(f"{ex.title} (epoch {trainer.current_epoch})")
        if not pictures:
            return
        pictures = _pad_to_common_size(pictures)
        for lg in loggers:
            lg.log_image(
                key=f"{self.split}/{self.key}",
                images=pictures,
                step=trainer.global_step,
                caption=captions,
            )


def _planted_regions(store: Any, img: int, cap: int, words: list[str]) -> list[int | None] | None:
    """Synthetic data only: per token, the region holding the concept the token names."""
    concepts = getattr(store, "concepts", None)
    regions = getattr(store, "concept_regions", None)
    concept_words = getattr(store, "concept_words", None)
    if concepts is None or regions is None or concept_words is None:
        return None
    where = {
        concept_words[int(c)]: int(r) for c, r in zip(concepts[img], regions[img], strict=False)
    }
    return [where.get(w) for w in words]


def _pad_to_common_size(pictures: list[np.ndarray]) -> list[np.ndarray]:
    """Pad ``[H, W, 3]`` uint8 pictures with white to one size (W&B shows a list of images
    correctly only when their sizes match)."""
    h = max(p.shape[0] for p in pictures)
    w = max(p.shape[1] for p in pictures)
    out = []
    for p in pictures:
        canvas = np.full((h, w, 3), 255, dtype=np.uint8)
        canvas[: p.shape[0], : p.shape[1]] = p
        out.append(canvas)
    return out
