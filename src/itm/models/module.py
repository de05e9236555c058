"""The LightningModule: encoders + Similarity + ContrastiveLoss, with full-matrix evaluation.

Logged while fitting (every logger; ``csv/metrics.csv``):

- ``train/loss``: the loss of each step, SUMMED over the batch's pairs (the VSE++ hinge
  reduction of all references), and ``train/loss_epoch``: that per-batch sum averaged over the
  epoch's batches, each batch weighted by its number of pairs (a short last batch counts for
  what it holds). Both are on the scale of a full batch's summed loss.
- ``train/epoch_time_s``: wall time of the epoch's training batches only (data loading,
  forward, backward, optimizer step), validation taken out; ``train/samples_per_s``: the
  training pairs of all ranks per second of that time.
- ``train/dev_time_s``: the dev evaluation of the epoch (encoding every dev image and caption
  plus the full-matrix scoring), and ``train/dev_scoring_time_s``: its scoring alone.
- ``train/lr`` (per parameter group: ``train/lr/<group>``) comes from Lightning's
  ``LearningRateMonitor`` (``callbacks.lr_monitor``); ``dev/*`` / ``test/*``: the recall figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, cast

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from itm.callbacks import EpochClock, no_progress
from itm.metrics import CrossModalRecall
from itm.models.align.vse_infinity import GlobalAlign
from itm.models.auxiliary.base import AUX_INPUTS
from itm.models.functional import loss_precision
from itm.models.penalty import weight_norm_penalty
from itm.models.similarity import Similarity, lengths_to_mask

#: ``(total pairs, description) -> context manager yielding progress(n_pairs) or None``
ScoringProgress = Callable[[int, str], AbstractContextManager[Callable[[int], None] | None]]


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """``module.trainer``, or None when the module is not attached to a trainer."""
    try:
        return module.trainer
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None


def _to_dict(cfg: Mapping | DictConfig) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def pad_cat(chunks: list[Tensor], dim: int = 1, value: float = 0.0) -> Tensor:
    """Concatenate ``[B_i, N_i, ...]`` tensors along axis 0, padding axis ``dim`` to the max."""
    size = max(c.shape[dim] for c in chunks)
    padded = []
    for c in chunks:
        if c.shape[dim] < size:
            shape = list(c.shape)
            shape[dim] = size - c.shape[dim]
            c = torch.cat([c, c.new_full(shape, value)], dim=dim)
        padded.append(c)
    return torch.cat(padded, dim=0)


def check_lengths(name: str, lengths: Tensor, x: Tensor, items: str) -> None:
    """``lengths [B]`` must count 1..``x.shape[1]`` valid items per row of ``x [B, N, ...]``
    (a set with no region / token cannot be matched; a length past the padded size would
    read padding). Raises ``ValueError`` naming the batch field and the offending values."""
    if x.dim() < 2 or lengths.dim() != 1 or lengths.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name} must have shape [{x.shape[0]}] for a batch of shape {tuple(x.shape)}, "
            f"got {tuple(lengths.shape)}"
        )
    if lengths.numel() == 0:
        return
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > x.shape[1]:
        bad = int(((lengths < 1) | (lengths > x.shape[1])).nonzero()[0, 0])
        raise ValueError(
            f"{name} must lie in 1..{x.shape[1]} (the padded number of {items}), got "
            f"{int(lengths[bad])} at batch position {bad} (min {lo}, max {hi})"
        )


def same_dtype(img: Tensor, cap: Tensor) -> tuple[Tensor, Tensor]:
    """Image and caption embeddings in one dtype: under autocast its dtype (an image encoder's
    Linear returns half, a GRU float32), else the promoted one."""
    if img.dtype == cap.dtype:
        return img, cap
    device = img.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(img.dtype, cap.dtype)
    return img.to(dtype), cap.to(dtype)


class ITMModule(pl.LightningModule):
    """Image-text matching model.

    Args:
        cfg: the resolved ``model`` config node (a plain dict travels in the checkpoint as
            hyperparameters, so ``ITMModule.load_from_checkpoint`` needs no Hydra). Keys:
            ``image_encoder``, ``text_encoder``, ``align``, ``pooling``, ``loss`` (instantiable
            nodes), ``optimizer`` (a ``_partial_`` optimizer node), ``scheduler`` (a
            ``_partial_`` lr scheduler node or null), ``warmup_epochs`` (epochs of
            sum-over-negatives loss before hardest negatives), ``eval_max_block_mb`` (memory
            budget of block-wise scoring), ``eval_precision`` (``fp32`` | ``bf16``, its
            precision), ``eval_rerank`` (null, or an ``eval.rerank`` node: MTFN re-ranked
            figures logged beside the plain ones as ``<split>/rr_*``);
            optional ``aux`` (an instantiable :class:`~itm.models.auxiliary.AuxLoss` node or
            null: the training loss gains ``aux.weight_at(epoch) x aux(...)``) and
            ``weight_norm_penalty`` (a coefficient: the loss gains it x
            :func:`~itm.models.weight_norm_penalty` of the image encoder).
    """

    def __init__(self, cfg: Mapping | DictConfig) -> None:
        super().__init__()
        cfg = _to_dict(cfg)
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.image_encoder = instantiate(cfg["image_encoder"])
        self.text_encoder = instantiate(cfg["text_encoder"])
        self.similarity = Similarity(instantiate(cfg["align"]), instantiate(cfg["pooling"]))
        self.criterion = instantiate(cfg["loss"])
        # auxiliary loss slot (model/aux: VSRN's caption generation, SAEM's angular loss)
        aux_cfg = cfg.get("aux")
        if aux_cfg and "_target_" not in aux_cfg:
            raise ValueError(
                f"model.aux has fields but no _target_ ({sorted(aux_cfg)}): choose a loss with "
                "model/aux=caption|angular, or drop the fields with model/aux=none"
            )
        self.aux = instantiate(aux_cfg) if aux_cfg else None
        self._check_aux()
        self.weight_norm_coef = float(cfg.get("weight_norm_penalty") or 0.0)
        self.warmup_epochs = int(cfg.get("warmup_epochs", 0))
        # DDP: hardest negatives over the batch of all ranks (itm.models.gather)
        self.loss_gather = bool(cfg.get("loss_gather", False))
        self.eval_max_block_mb = float(cfg.get("eval_max_block_mb", 256))
        self.eval_precision = str(cfg.get("eval_precision", "fp32"))
        if self.eval_precision == "bf16":  # refused before training, not at the first epoch's end
            from itm.models.align.engine import check_bf16

            check_bf16(self.similarity.align)
        self._eval_buffers: dict[str, list[tuple[Tensor, ...]]] = {"img": [], "cap": []}
        #: wall time of the current training epoch without its validation (itm.callbacks)
        self.epoch_clock = EpochClock()
        self._eval_start = 0.0
        self._scoring_s = 0.0
        #: progress of full-matrix scoring; a progress-bar callback sets it (RichProgress)
        self.scoring_progress: ScoringProgress = no_progress

    # --- encoding ---------------------------------------------------------------------------

    @staticmethod
    def _unpack(out: Tensor | tuple[Tensor, Tensor], lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encoders return ``emb`` or ``(emb, new_lengths)`` (size augmentation in training)."""
        return out if isinstance(out, tuple) else (out, lengths)

    def image_inputs(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The batch fields the image encoder declares in ``extra_inputs`` (PFAN:
        ``positions``), as keyword arguments of :meth:`encode_images`."""
        names = getattr(self.image_encoder, "extra_inputs", ())
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(
                f"the image encoder {type(self.image_encoder).__name__} needs the batch "
                f"field(s) {missing}, which the data did not serve (set the datamodule's "
                f"image_inputs to {tuple(names)}; train.py and eval.py do it)"
            )
        return {n: batch[n] for n in names}

    def encode_images(
        self, images: Tensor, lengths: Tensor, **extra: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``images [B, K, img_dim]`` (+ the encoder's ``extra_inputs``, e.g. ``positions
        [B, K, W]``) -> (``[B, K', d]``, lengths ``[B]``)."""
        check_lengths("img_lens", lengths, images, "regions")
        return self._unpack(self.image_encoder(images, lengths, **extra), lengths)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens [B, L]`` -> (``[B, L', d]``, lengths ``[B]``)."""
        check_lengths("cap_lens", lengths, tokens, "tokens")
        return self._unpack(self.text_encoder(tokens, lengths), lengths)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Scores ``[B, B]`` of a training batch (image i with caption j), in float32: under
        bf16 / fp16 autocast the head's products run in half precision, but the hinge loss
        summed over a batch (margin 0.2) would lose digits, so the loss sees float32."""
        img, img_lens = self.encode_images(
            batch["images"], batch["img_lens"], **self.image_inputs(batch)
        )
        cap, cap_lens = self.encode_captions(batch["captions"], batch["cap_lens"])
        img, cap = same_dtype(img, cap)
        return loss_precision(self.similarity(img, img_lens, cap, cap_lens))

    # --- training ---------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self.epoch_clock.start()

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        hardest = self.current_epoch >= self.warmup_epochs
        img, img_lens = self.encode_images(
            batch["images"], batch["img_lens"], **self.image_inputs(batch)
        )
        cap, cap_lens = self.encode_captions(batch["captions"], batch["cap_lens"])
        img, cap = same_dtype(img, cap)
        n = img.shape[0]
        vectors = None
        trainer = attached_trainer(self)
        if self.loss_gather and trainer is not None and trainer.world_size > 1:
            loss = self._gathered_loss(
                batch, img, img_lens, cap, cap_lens, hardest and self.criterion.max_violation
            )
        else:
            if self.aux is not None and self.aux.inputs == "global":
                # the global head's score from its vectors, which the aux loss reuses
                img_vec, cap_vec = self._global_vectors(img, img_lens, cap, cap_lens)
                vectors = (loss_precision(img_vec), loss_precision(cap_vec))
                sims = vectors[0] @ vectors[1].T
            else:
                # float32 for the loss, as forward(): see its docstring
                sims = loss_precision(self.similarity(img, img_lens, cap, cap_lens))
            loss = self.criterion(
                sims,
                max_violation=hardest and self.criterion.max_violation,
                img_ids=batch["img_ids"],
                cap_img_ids=batch["img_ids"],
            )
        loss = loss + self._extra_losses(batch, img, img_lens, cap, cap_lens, vectors)
        self.epoch_clock.samples += n
        # the batch-summed loss per step, and its epoch mean weighted by batch size (all ranks)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log(
            "train/loss_epoch",
            loss.detach(),
            on_step=False,
            on_epoch=True,
            batch_size=n,
            sync_dist=True,
        )
        return loss

    # --- auxiliary losses (model/aux, model.weight_norm_penalty) -----------------------------

    def _check_aux(self) -> None:
        if self.aux is None:
            return
        inputs = getattr(self.aux, "inputs", None)
        if inputs not in AUX_INPUTS:
            raise ValueError(
                f"model.aux: {type(self.aux).__name__}.inputs must be one of {AUX_INPUTS}, "
                f"got {inputs!r}"
            )
        if inputs == "global" and not hasattr(self.similarity.align, "embed"):
            raise ValueError(
                f"model.aux={type(self.aux).__name__} needs the global vectors of the `global` "
                f"head (model/align=global), got {type(self.similarity.align).__name__}"
            )

    def _global_vectors(
        self, img: Tensor, img_lens: Tensor, cap: Tensor, cap_lens: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The global head's l2-normalised vectors ``([B, d], [B, d])`` of a batch."""
        img_mask = lengths_to_mask(img_lens.to(img.device), img.shape[1])
        cap_mask = lengths_to_mask(cap_lens.to(cap.device), cap.shape[1])
        head = self.similarity.align
        assert isinstance(head, GlobalAlign), "checked at construction (_check_aux)"
        return head.embed(img, img_mask, cap, cap_mask)

    def _extra_losses(
        self,
        batch: Mapping[str, Tensor],
        img: Tensor,
        img_lens: Tensor,
        cap: Tensor,
        cap_lens: Tensor,
        vectors: tuple[Tensor, Tensor] | None,
    ) -> Tensor | float:
        """``aux.weight_at(epoch) x aux(...)`` (skipped at weight 0) plus the weight-norm
        penalty; each term is logged unweighted (``train/aux_loss``, ``train/weight_norm``)."""
        n = img.shape[0]
        total: Tensor | float = 0.0
        aux = self.aux
        weight = aux.weight_at(self.current_epoch) if aux is not None else 0.0
        if weight and aux is not None:
            if aux.inputs == "fragments":
                term = aux(img, img_lens, batch["captions"], batch["cap_lens"])
            else:
                if vectors is None:
                    vectors = self._global_vectors(img, img_lens, cap, cap_lens)
                term = aux(*vectors)
            self.log("train/aux_loss", term, batch_size=n)
            total = total + weight * term
        if self.weight_norm_coef:
            penalty = weight_norm_penalty(self.image_encoder)
            self.log("train/weight_norm", penalty, batch_size=n)
            total = total + self.weight_norm_coef * penalty
        return total

    def _gathered_loss(
        self,
        batch: Mapping[str, Tensor],
        img: Tensor,
        img_lens: Tensor,
        cap: Tensor,
        cap_lens: Tensor,
        max_violation: bool,
    ) -> Tensor:
        """This rank's share of the loss of the global batch: local images x all captions and
        all images x local captions, embeddings gathered with gradients (itm.models.gather)."""
        from itm.models.gather import gathered_contrastive_loss

        loss, _ = gathered_contrastive_loss(
            self.similarity,
            img,
            img_lens,
            cap,
            cap_lens,
            all_gather=lambda t, sync_grads: cast(
                Tensor, self.all_gather(t, sync_grads=sync_grads)
            ),
            rank=self.global_rank,
            margin=self.criterion.margin,
            max_violation=max_violation,
            cap_ids=batch.get("cap_ids"),
            img_ids=batch["img_ids"],
            mask_false_negatives=self.criterion.mask_false_negatives,
        )
        return loss

    def on_train_epoch_end(self) -> None:
        seconds = self.epoch_clock.train_seconds
        # the slowest rank's time; the pairs of all ranks per second
        self.log("train/epoch_time_s", seconds, sync_dist=True, reduce_fx="max")
        rate = self.epoch_clock.samples / max(seconds, 1e-9)
        self.log("train/samples_per_s", rate, sync_dist=True, reduce_fx="sum")

    def on_validation_start(self) -> None:
        self.epoch_clock.pause()  # validation inside a training epoch is not training time

    def on_validation_end(self) -> None:
        self.epoch_clock.resume()

    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        optimizer = instantiate(self.cfg["optimizer"])(groups)
        sched_cfg = self.cfg.get("scheduler")
        if sched_cfg:
            scheduler = instantiate(sched_cfg)(optimizer)
        else:  # a constant schedule, so that the lr is logged under the same name
            scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        # `name`: LearningRateMonitor logs train/lr (one group) or train/lr/<group name>
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "name": "train/lr"},
        }

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups; a sub-module exposing ``lr_mult_groups()`` (BERT) gets its lrs.

        Each group carries ``lr`` = base lr x multiplier (schedulers scale every group). With
        more than one group each has a ``name`` (``base``; the sub-module's name, e.g.
        ``text_encoder``, with ``.<i>`` for its i-th group past the first), under which
        ``LearningRateMonitor`` logs its lr (``train/lr/<name>``).
        """
        base_lr = float(self.cfg["optimizer"]["lr"])
        groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for name, module in self.named_modules():
            if module is self or not hasattr(module, "lr_mult_groups"):
                continue
            for i, (params, mult) in enumerate(module.lr_mult_groups()):
                params = [p for p in params if p.requires_grad and id(p) not in seen]
                seen.update(id(p) for p in params)
                if params:
                    label = name if i == 0 else f"{name}.{i}"
                    groups.append({"params": params, "lr": base_lr * mult, "name": label})
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        if rest:
            groups.insert(0, {"params": rest, "lr": base_lr, "name": "base"})
        if len(groups) == 1:
            groups[0].pop("name")  # one group: logged as plain train/lr
        return groups

    # --- checkpoints (exact resume; itm.checkpoint) -----------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the global RNG states (torch, CUDA, numpy, Python): with them a resumed run
        replays the same data order and random augmentation as an uninterrupted one. Also the
        W&B run (``itm.loggers.WANDB_RUN_KEY``), which a resumed run continues."""
        from itm.checkpoint import RNG_KEY, collect_rng_state
        from itm.loggers import WANDB_RUN_KEY, wandb_run_state

        checkpoint[RNG_KEY] = collect_rng_state()
        trainer = attached_trainer(self)
        run = wandb_run_state(trainer.loggers) if trainer is not None else None
        if run is not None:
            checkpoint[WANDB_RUN_KEY] = run

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture (naming the differing config keys);
        when ``trainer.fit`` resumes, put back the RNG states saved with it."""
        from itm.checkpoint import check_model_config, restore_rng_state, rng_state_from

        saved = (checkpoint.get("hyper_parameters") or {}).get("cfg")
        if isinstance(saved, Mapping):
            check_model_config(saved, self.cfg)
        state = rng_state_from(checkpoint)
        trainer = attached_trainer(self)
        if state is not None and trainer is not None and trainer.state.fn == "fit":
            restore_rng_state(state)

    # --- evaluation -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Check ``eval_rerank`` before any training (a bad node fails now, not after an
        epoch)."""
        self._rerank_spec()

    def _rerank_spec(self):
        """The MTFN re-ranking of validation / test (``cfg.eval_rerank``), or ``None``."""
        if not hasattr(self, "_rerank"):
            from itm.metrics import RerankSpec

            self._rerank = RerankSpec.from_config(self.cfg.get("eval_rerank"))
        return self._rerank

    def on_validation_epoch_start(self) -> None:
        self._eval_buffers = {"img": [], "cap": []}
        self._eval_start = time.perf_counter()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        if "images" in batch:
            emb, lens = self.encode_images(
                batch["images"], batch["img_lens"], **self.image_inputs(batch)
            )
            self._eval_buffers["img"].append((batch["img_ids"], emb, lens))
        else:
            emb, lens = self.encode_captions(batch["captions"], batch["cap_lens"])
            self._eval_buffers["cap"].append((batch["cap_ids"], emb, lens, batch["cap_img_ids"]))

    test_step = validation_step

    def gathered_embeddings(self) -> dict[str, Tensor]:
        """Every image and caption embedding of the split, in dataset order, duplicates removed.

        Returns ``img [N_img, K, d]``, ``img_lens``, ``cap [N_cap, L, d]``, ``cap_lens``,
        ``cap_to_img [N_cap]``.
        """
        out: dict[str, Tensor] = {}
        for kind in ("img", "cap"):
            buf = self._eval_buffers[kind]
            ids = torch.cat([b[0] for b in buf])
            emb = pad_cat([b[1] for b in buf])
            lens = torch.cat([b[2] for b in buf])
            extra = torch.cat([b[3] for b in buf]) if kind == "cap" else None
            if self.trainer is not None and self.trainer.world_size > 1:
                ids, emb, lens, extra = self._all_gather_padded(ids, emb, lens, extra)
            uniq, first = _first_occurrence(ids)
            if uniq.numel() != int(uniq.max()) + 1:
                raise RuntimeError(f"evaluation {kind} ids are not 0..N-1 ({uniq.numel()} ids)")
            out[kind], out[f"{kind}_lens"] = emb[first], lens[first]
            if extra is not None:
                out["cap_to_img"] = extra[first]
        return out

    def _all_gather_padded(self, ids, emb, lens, extra):
        """All-gather per-rank tensors whose set axis may differ in size between ranks."""
        size = torch.tensor([emb.shape[1]], device=emb.device)
        max_size = int(self.all_gather(size).max())
        if emb.shape[1] < max_size:
            pad = emb.new_zeros(emb.shape[0], max_size - emb.shape[1], emb.shape[2])
            emb = torch.cat([emb, pad], dim=1)
        gathered = [self.all_gather(t) for t in (ids, emb, lens)]
        gathered = [g.reshape(-1, *g.shape[2:]) for g in gathered]
        g_extra = self.all_gather(extra).reshape(-1) if extra is not None else None
        return (*gathered, g_extra)

    def _evaluate(self, split: str) -> dict[str, float]:
        e = self.gathered_embeddings()
        # mixed precision: embeddings come out of autocast in half (images: Linear) or float32
        # (captions: GRU); the full-matrix scoring runs outside autocast, in float32
        for key in ("img", "cap"):
            e[key] = loss_precision(e[key])
        # with eval_rerank the metric also re-ranks the matrix it gathers (once, in full)
        metric = CrossModalRecall(cap_to_img=e["cap_to_img"].cpu(), rerank=self._rerank_spec())
        metric = metric.to(self.device)
        rank, world = self.global_rank, self.trainer.world_size if self.trainer else 1
        rows = torch.arange(rank, e["img"].shape[0], world, device=e["img"].device)
        n_pairs = rows.numel() * e["cap"].shape[0]
        t0 = time.perf_counter()
        with self.scoring_progress(n_pairs, f"{split} scoring") as progress:
            sims = self.similarity.score_matrix(
                e["img"][rows],
                e["img_lens"][rows],
                e["cap"],
                e["cap_lens"],
                self.eval_max_block_mb,
                progress=progress,
                precision=self.eval_precision,
            )
        self._scoring_s = time.perf_counter() - t0
        metric.update(sims, rows)
        results = {k: float(v) for k, v in metric.compute().items()}
        # VSRN's model-selection figure (R@1 + R@5 of both directions, no R@10), for
        # callbacks.model_checkpoint.monitor=dev/r1r5_sum
        results["r1r5_sum"] = sum(results[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5))
        self.log_dict({f"{split}/{k}": v for k, v in results.items()}, sync_dist=False)
        self._eval_buffers = {"img": [], "cap": []}
        return results

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._eval_buffers = {"img": [], "cap": []}
            return
        self._evaluate("dev")
        if self.trainer.state.fn == "fit":  # the dev evaluation of a training epoch: timed too
            self.log("train/dev_time_s", time.perf_counter() - self._eval_start, sync_dist=True)
            self.log("train/dev_scoring_time_s", self._scoring_s, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")


def _first_occurrence(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique ids and, for each, the position of its first occurrence in ``ids``."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    pos = torch.arange(ids.numel(), device=ids.device)
    first = torch.full_like(uniq, ids.numel()).scatter_reduce(0, inverse, pos, reduce="amin")
    return uniq, first


__all__ = ["ITMModule", "check_lengths", "pad_cat"]
