"""bf16: scoring with ``precision="bf16"`` (eval.precision) and training under
``trainer.precision=bf16-mixed``, for every configured head.

- Scoring: a briefly trained model of each head (``tests/trained.py``, shared with the alignment
  tests) scores the 200-image synthetic test split in float32 and in bf16; every recall figure
  (R@1/5/10 of both directions) must stay within 0.5 points, and the largest score difference is
  reported. A head without bf16 support must refuse it (the conformance suite checks the
  message).
- Training: two bf16-mixed steps of every head train with a finite float32 loss and finite
  gradients.
"""

from __future__ import annotations

import pytest
import torch

import conformance as C
from itm.metrics import recall_at_k
from trained import SLOW_TO_TRAIN, head_budget, score_split, trained

HEADS = C.discover("model/align")
RECALL_KEYS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def _param(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW_TO_TRAIN else name


@pytest.mark.parametrize("name", [_param(n) for n in HEADS])
def test_bf16_scoring_keeps_every_recall_within_half_a_point(name, capsys):
    extra, epochs = head_budget(name)
    if name == "global":
        extra = (*extra, "pooling=gpo")
    model, dm = trained((f"model/align={name}", *extra), epochs)
    if not model.similarity.align.supports_bf16:
        with pytest.raises(ValueError, match="bf16"):
            score_split(model, dm, precision="bf16")
        return
    fp32 = score_split(model, dm)
    bf16 = score_split(model, dm, precision="bf16")
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    r32, r16 = recall_at_k(fp32), recall_at_k(bf16)
    diffs = {k: abs(r32[k] - r16[k]) for k in RECALL_KEYS}
    max_score = float((fp32 - bf16).abs().max())
    with capsys.disabled():
        print(
            f"\n[bf16 {name}] rsum fp32 {r32['rsum']:.2f} bf16 {r16['rsum']:.2f}; largest recall "
            f"difference {max(diffs.values()):.2f} points; largest score difference "
            f"{max_score:.2e} (scores up to {float(fp32.abs().max()):.2f})"
        )
    assert r32["rsum"] > 100, r32  # a trained model (chance ~16)
    assert max(diffs.values()) <= 0.5, diffs


@pytest.mark.parametrize("name", HEADS)
def test_bf16_mixed_training_steps(name):
    """Two optimiser steps under ``precision="bf16-mixed"``: finite float32 loss, finite
    parameters, the similarity in float32."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from itm.models.module import ITMModule
    from itm.train import build_datamodule

    with C.hydra_config() as compose:
        cfg = compose(
            [
                f"model/align={name}",
                "model.embed_size=16",
                "model.text_encoder.word_dim=8",
                "data.n_train=32",
                "data.n_dev=8",
                "data.n_test=8",
                "data.batch_size=16",
            ]
        )
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    seen = []
    real = model.criterion.forward

    def spy(sims, *args, **kwargs):
        seen.append(sims.dtype)
        loss = real(sims, *args, **kwargs)
        seen.append(loss.dtype)
        return loss

    model.criterion.forward = spy  # type: ignore[method-assign]
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert seen and all(dt == torch.float32 for dt in seen), seen
    assert all(torch.isfinite(p).all() for p in model.parameters())
