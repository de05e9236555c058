"""Small models trained briefly on the built-in synthetic data, shared by the tests that need a
trained head (alignment on the planted ground truth, bf16 vs fp32 recall).

Each head is trained once per test process (cached by its overrides): 600 training images,
d = 32, two epochs (a few seconds to a minute on 2 cores); the test split is the default 200
images x 5 captions (chance rsum ~16).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

import conformance as C

#: the short training budget (every head's own config and recipe-independent settings)
BUDGET = (
    "model.embed_size=32",
    "data.n_train=600",
    "data.n_dev=50",
    "data.batch_size=50",
    "model.optimizer.lr=3e-3",
)
EPOCHS = 2
#: heads whose short training takes over a minute on 2 cores (their tests are marked slow: they
#: run in CI and `make test-all`)
SLOW_TO_TRAIN = {"imram", "sgraf"}
#: per-head budget: SGRAF's score network starts flat (scores ~0.5 +- 0.004 at init) and from
#: hardest negatives its batch collapses (the hinge at 2 x B x margin) within this budget: it
#: trains on the sum over all negatives throughout (measured: concept-word hit 0.39 for the
#: default sgr; 0.18 with one warm-up epoch, 0.08 with none), in smaller batches (more steps),
#: with similarity vectors at the small joint space's scale, for 4 epochs
HEAD_BUDGET: dict[str, tuple[tuple[str, ...], int]] = {
    "sgraf": (("model.align.sim_dim=32", "data.batch_size=20", "model.warmup_epochs=4"), 4),
}


def head_budget(name: str) -> tuple[tuple[str, ...], int]:
    """(extra overrides, epochs) of ``model/align=<name>``'s short training."""
    return HEAD_BUDGET.get(name, ((), EPOCHS))


@functools.cache
def trained(overrides: tuple[str, ...], epochs: int = EPOCHS) -> tuple[Any, Any]:
    """``(model, datamodule)`` after ``epochs`` epochs of ``train.yaml`` + ``overrides``
    (seed 0, one thread, no logging, no checkpoints, no validation)."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from itm.models.module import ITMModule
    from itm.train import build_datamodule

    with C.hydra_config() as compose:
        cfg = compose([*BUDGET, *overrides])
    dm = build_datamodule(cfg)
    pl.seed_everything(0, workers=True)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            gradient_clip_val=2.0,
        )
        trainer.fit(model, datamodule=dm)
    finally:
        torch.set_num_threads(threads)
    return model.eval(), dm


@torch.no_grad()
def planted_alignment(model: Any, dm: Any, split: str = "test") -> dict[str, float]:
    """How well the head's alignment picture finds the planted ground truth of the synthetic
    data: for every concept word of every caption of ``split`` (paired with its own image),
    ``hit`` = the fraction whose most-weighted region is the region holding that concept,
    ``weight`` = the mean weight on that region (when the picture is a distribution over
    regions, else NaN); ``chance`` = 1 / regions."""
    store = dm.get_split(split)
    tokenizer = getattr(dm, "caption_tokenizer", None) or dm.vocab
    head = model.similarity.align
    n_regions = store.images.shape[1]
    concept_of = {w: c for c, w in enumerate(store.concept_words)}
    hits, weights = [], []
    for i in range(len(store)):
        feats = torch.from_numpy(np.asarray(store.images[i], dtype=np.float32))[None]
        v, v_len = model.encode_images(feats, torch.tensor([n_regions]))
        where = {
            int(c): int(r) for c, r in zip(store.concepts[i], store.concept_regions[i], strict=True)
        }
        for c in np.flatnonzero(np.asarray(store.cap_to_img) == i):
            ids = list(tokenizer.encode(store.captions[c]))
            e, e_len = model.encode_captions(torch.tensor([ids]), torch.tensor([len(ids)]))
            att = head.alignment(v[0, : int(v_len[0])], e[0, : int(e_len[0])])  # [L, K]
            words = ["<start>", *store.captions[c].split(), "<end>"]
            assert len(words) == att.shape[0], "one token per word (the synthetic vocabulary)"
            for w, word in enumerate(words):
                r = where.get(concept_of.get(word, -1))
                if r is None:
                    continue
                hits.append(float(int(att[w].argmax()) == r))
                if head.alignment_normalised == "regions":
                    weights.append(float(att[w, r]))
    return {
        "hit": float(np.mean(hits)),
        "weight": float(np.mean(weights)) if weights else float("nan"),
        "chance": 1.0 / n_regions,
        "n": float(len(hits)),
    }


@torch.no_grad()
def score_split(model: Any, dm: Any, split: str = "test", **options: Any) -> torch.Tensor:
    """The full ``[N_img, N_cap]`` score matrix of ``split`` (images and captions encoded once,
    scored by the block engine; ``options`` go to ``score_matrix``, e.g. ``precision``)."""
    from itm.evaluate import encode_split

    e = encode_split(model, dm, split)
    return model.similarity.score_matrix(
        e["img"], e["img_lens"], e["cap"], e["cap_lens"], **options
    )


def chance_rsum(n_images: int) -> float:
    """rsum of random scores with ``n_images`` images and 5 captions each (R@K ~ K / N)."""
    return 2 * sum(100.0 * k / n_images for k in (1, 5, 10))
