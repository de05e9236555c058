"""Wiring of the LightningModule: what the config says reaches the optimisation.

The warm-up switch to hardest negatives at ``model.warmup_epochs``, BERT parameters at
``lr x lr_mult``, the lr schedule per epoch (SCAN: x0.1 every ``lr_update``; CHAN /
VSE-infinity: once), gradient clipping (the configured value reaches the Trainer and clips),
``mask_false_negatives`` through ``loss_gather``, and the float32 similarity the loss sees under
bf16 / fp16 autocast.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from itm.models.module import ITMModule, same_dtype
from itm.train import build_datamodule

TINY = [
    "model.embed_size=16",
    "model.text_encoder.word_dim=8",
    "data.n_train=32",
    "data.n_dev=8",
    "data.n_test=8",
    "data.batch_size=16",
]


def _tiny(compose, overrides=()):
    base = [o for o in TINY if "bert" not in " ".join(overrides) or "word_dim" not in o]
    cfg = compose([*base, *overrides])
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    return cfg, dm, model


def _fit(model, dm, callbacks=(), **trainer_kwargs):
    kwargs = dict(
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(model, datamodule=dm)
    return trainer


def _batch(dm):
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


# --- warm-up -----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_violation", [True, False])
def test_warmup_switches_to_hardest_negatives(compose, max_violation):
    """Sum over negatives for epochs < warmup_epochs, then hardest negatives (when the loss's
    max_violation is on; never when it is off)."""
    _, dm, model = _tiny(
        compose, ["model.warmup_epochs=2", f"model.loss.max_violation={max_violation}"]
    )
    seen: dict[int, set[bool]] = {}
    real = model.criterion.forward

    def spy(sims, *args, max_violation=None, **kwargs):
        seen.setdefault(model.current_epoch, set()).add(bool(max_violation))
        return real(sims, *args, max_violation=max_violation, **kwargs)

    model.criterion.forward = spy  # type: ignore[method-assign]
    _fit(model, dm, max_epochs=3, limit_train_batches=2)
    assert seen == {0: {False}, 1: {False}, 2: {max_violation}}, seen


# --- optimizer groups ----------------------------------------------------------------------------


def test_bert_parameters_train_at_lr_times_lr_mult(compose, tiny_bert):
    _, _, model = _tiny(
        compose,
        [
            "model/text_encoder=bert",
            f"model.text_encoder.path={tiny_bert}",
            "model.text_encoder.lr_mult=0.25",
            "model.optimizer.lr=4e-4",
        ],
    )
    optimizer = model.configure_optimizers()["optimizer"]
    by_param = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    bert = {id(p) for p in model.text_encoder.bert.parameters()}
    assert bert and all(by_param[i] == pytest.approx(1e-4) for i in bert)
    rest = [p for p in model.parameters() if id(p) not in bert]
    assert rest and all(by_param[id(p)] == pytest.approx(4e-4) for p in rest)
    # every trainable parameter in exactly one group
    counted = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(counted) == sorted(id(p) for p in model.parameters() if p.requires_grad)


# --- lr schedule ---------------------------------------------------------------------------------


def _lrs(scheduler_cfg, base_lr: float, epochs: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = instantiate(scheduler_cfg)(optimizer)
    out = []
    for _ in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(
    "experiment, every",
    [
        ("scan_t2i_avg", True),
        ("bfan_equal", True),
        ("imram_full", True),
        ("chan_bigru", False),
        ("chan_bert", False),
        ("vse_inf_bigru", False),
        ("vse_inf_bert", False),
    ],
)
def test_recipe_lr_schedule_per_epoch(compose, experiment, every):
    """SCAN / BFAN / IMRAM: x0.1 every lr_update (15) epochs; CHAN / VSE-infinity: x0.1 once
    at epoch 15 (also in a run longer than the recipe's 25 epochs)."""
    over = [f"experiment={experiment}"]
    if "bert" in experiment:
        over.append("model.text_encoder.path=/nowhere")  # composed only, never built
    cfg = compose(over)
    base = float(cfg.model.optimizer.lr)
    lrs = _lrs(cfg.model.scheduler, base, 46)
    for epoch, lr in enumerate(lrs):
        decays = epoch // 15 if every else min(epoch // 15, 1)
        assert lr == pytest.approx(base * 0.1**decays), (experiment, epoch, lrs)


def test_the_module_steps_the_schedule_once_per_epoch(compose):
    _, dm, model = _tiny(compose, ["model.scheduler.step_size=1", "model.optimizer.lr=1e-3"])
    seen = []

    class Record(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    _fit(model, dm, [Record()], max_epochs=3, limit_train_batches=2)
    assert seen == pytest.approx([1e-3, 1e-4, 1e-5])


# --- gradient clipping ---------------------------------------------------------------------------


def test_gradient_clipping_reaches_the_trainer_and_clips(compose, monkeypatch):
    cfg, dm, model = _tiny(compose)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=False)
    assert trainer_cfg["gradient_clip_val"] == 2.0
    assert trainer_cfg["gradient_clip_algorithm"] == "norm"
    trainer = instantiate(
        cfg.trainer,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=None,
        plugins=None,
    )
    assert trainer.gradient_clip_val == 2.0
    assert str(trainer.gradient_clip_algorithm) in ("norm", "GradClipAlgorithmType.NORM")
    real = model.criterion.forward
    model.criterion.forward = lambda *a, **k: real(*a, **k) * 1e4  # type: ignore[method-assign]
    norms: list[tuple[float, float]] = []

    def grad_norm() -> float:
        grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
        return float(torch.cat(grads).norm())

    class Measure(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norms.append((grad_norm(), float("nan")))  # before clipping

        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            step = optimizer.step

            def measured(closure=None):
                loss = closure() if closure is not None else None
                norms[-1] = (norms[-1][0], grad_norm())  # what the step uses
                return step(closure=lambda: loss)

            optimizer.step = measured

    trainer.callbacks.append(Measure())
    trainer.fit(model, datamodule=dm)
    assert len(norms) == 3
    for before, after in norms:
        assert before > 10.0, norms  # the scaled loss gives large gradients
        assert after == pytest.approx(2.0, rel=1e-3), norms


# --- loss_gather + mask_false_negatives ------------------------------------------------------


def test_mask_false_negatives_reaches_the_gathered_loss(compose, monkeypatch):
    """With one rank, the gathered loss is the plain loss; a caption of the same image is not a
    negative when model.loss.mask_false_negatives is set, also through model.loss_gather (sum
    over negatives, so that the masked pair always counts)."""
    values = {}
    for mask in (False, True):
        _, dm, model = _tiny(
            compose, ["model.loss_gather=true", f"model.loss.mask_false_negatives={mask}"]
        )
        assert model.loss_gather and model.criterion.mask_false_negatives is mask
        batch = _batch(dm)
        batch["img_ids"] = batch["img_ids"].clone()
        batch["img_ids"][1] = batch["img_ids"][0]  # two captions of one image in the batch
        monkeypatch.setattr(model, "all_gather", lambda t, sync_grads=False: t[None])
        img, il = model.encode_images(batch["images"], batch["img_lens"])
        cap, cl = model.encode_captions(batch["captions"], batch["cap_lens"])
        with torch.no_grad():
            gathered = model._gathered_loss(batch, img, il, cap, cl, max_violation=False)
            plain = model.criterion(
                model.similarity(img, il, cap, cl),
                max_violation=False,
                img_ids=batch["img_ids"],
                cap_img_ids=batch["img_ids"],
            )
        torch.testing.assert_close(gathered, plain, rtol=1e-5, atol=1e-5)
        values[mask] = float(gathered)
    assert values[True] != pytest.approx(values[False])


# --- float32 similarity under autocast --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("gather", [False, True], ids=["plain", "loss_gather"])
def test_the_loss_sees_float32_scores_under_autocast(compose, monkeypatch, dtype, gather):
    import itm.models.gather as gather_mod

    _, dm, model = _tiny(compose, [f"model.loss_gather={str(gather).lower()}"])
    batch = _batch(dm)
    seen: list[torch.dtype] = []
    if gather:
        real_hinge = gather_mod.cross_rank_hinge

        def spy_hinge(rows, cols, *args, **kwargs):
            seen.extend([rows.dtype, cols.dtype])
            return real_hinge(rows, cols, *args, **kwargs)

        monkeypatch.setattr(gather_mod, "cross_rank_hinge", spy_hinge)
        monkeypatch.setattr(model, "all_gather", lambda t, sync_grads=False: t[None])
    else:
        real = model.criterion.forward

        def spy(sims, *args, **kwargs):
            seen.append(sims.dtype)
            return real(sims, *args, **kwargs)

        monkeypatch.setattr(model.criterion, "forward", spy)
    scored: list[torch.dtype] = []
    real_sim = model.similarity.forward

    def spy_sim(*args, **kwargs):
        out = real_sim(*args, **kwargs)
        scored.append(out.dtype)
        return out

    monkeypatch.setattr(model.similarity, "forward", spy_sim)
    with torch.autocast("cpu", dtype=dtype):
        img, il = model.encode_images(batch["images"], batch["img_lens"])
        cap, cl = model.encode_captions(batch["captions"], batch["cap_lens"])
        if gather:  # as training_step: one dtype for both sides first
            img, cap = same_dtype(img, cap)
            loss = model._gathered_loss(batch, img, il, cap, cl, max_violation=True)
        else:
            loss = model.training_step(batch, 0)
    assert dtype in scored, scored  # the head really ran in half precision
    assert seen and all(d == torch.float32 for d in seen), seen
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
