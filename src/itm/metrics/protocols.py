"""Standard evaluation protocols of Flickr30K / MS-COCO retrieval (docs/evaluation.md).

- ``f30k``: the whole matrix (usually 1000 images x 5000 captions).
- ``coco5k``: the whole COCO ``testall`` matrix (5000 x 25000).
- ``coco1k``: 5 folds of ``fold_images`` images (fold ``f`` = images ``f*F .. f*F+F-1`` and their
  captions ``f*F*cpi .. (f+1)*F*cpi - 1``); every R@K, medr and meanr is averaged over the folds
  and ``rsum`` is the sum of the six AVERAGED R@K (not the references' misprinted value).
- ``coco1k+5k``: both, as ``{"coco1k": ..., "coco5k": ...}``.

``ensemble`` averages the score matrices of several models before ranking.

With ``rerank`` (an MTFN :class:`~itm.metrics.rerank.RerankSpec`) every figure comes from the
re-ranked orders instead, re-ranked INSIDE each COCO 1K fold (a fold is its own retrieval
problem) and once on the whole matrix for ``f30k`` / ``coco5k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from itm.metrics.recall import METRIC_KEYS, recall_at_k
from itm.metrics.rerank import RerankSpec

__all__ = ["PROTOCOLS", "ensemble", "evaluate_protocol"]

PROTOCOLS: tuple[str, ...] = ("f30k", "coco5k", "coco1k", "coco1k+5k")

Matrix = TypeVar("Matrix", Tensor, np.ndarray)


def _shape(sims: Any) -> tuple[int, ...]:
    if not isinstance(sims, Tensor | np.ndarray):
        raise TypeError(f"sims must be a torch tensor or a numpy array, got {type(sims)}")
    return tuple(sims.shape)


def _scorer(rerank: RerankSpec | None, text_sims: Any):
    """``score(block, caption_slice, cpi) -> recall dict``: plain, or of the re-ranked orders
    (``text_sims`` restricted to the block's captions)."""
    if rerank is None:
        return lambda block, caps, cpi: recall_at_k(block, cpi)
    if rerank.t2i == "text_sim" and text_sims is None:
        text_sims = rerank.load_text_sims()

    def score(block: Any, caps: slice, cpi: int) -> dict[str, Any]:
        ts = text_sims[caps, caps] if text_sims is not None else None
        return rerank.recall(block, cpi, ts)

    return score


def _five_fold(
    sims: Tensor | np.ndarray,
    captions_per_image: int,
    fold_images: int,
    n_folds: int,
    score: Any = None,
) -> dict[str, Any]:
    shape = _shape(sims)
    if len(shape) != 2:
        raise ValueError(f"sims must be a 2-D [N_img, N_cap] matrix, got shape {shape}")
    n_img, n_cap = shape
    fold_caps = fold_images * captions_per_image
    if fold_images < 1 or n_img != n_folds * fold_images or n_cap != n_folds * fold_caps:
        raise ValueError(
            f"the coco1k protocol needs {n_folds} folds of {fold_images} images x {fold_caps} "
            f"captions, i.e. a [{n_folds * fold_images}, {n_folds * fold_caps}] matrix; got "
            f"{list(shape)}"
        )
    score = score or _scorer(None, None)
    folds = []
    for f in range(n_folds):
        caps = slice(f * fold_caps, (f + 1) * fold_caps)
        block = sims[f * fold_images : (f + 1) * fold_images, caps]
        folds.append(score(block, caps, captions_per_image))
    averaged = {
        key: sum(fold[key] for fold in folds) / n_folds for key in METRIC_KEYS if key != "rsum"
    }
    averaged["rsum"] = sum(averaged[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    out: dict[str, Any] = {key: averaged[key] for key in METRIC_KEYS}
    out["folds"] = folds
    return out


def evaluate_protocol(
    sims: Tensor | np.ndarray,
    protocol: str,
    captions_per_image: int = 5,
    *,
    fold_images: int = 1000,
    n_folds: int = 5,
    rerank: RerankSpec | None = None,
    text_sims: Any = None,
) -> dict[str, Any]:
    """Evaluate a full [N_img, N_cap] score matrix under a named protocol.

    Args:
        sims: [N_img, N_cap] torch tensor or numpy array, caption ``c`` of image
            ``c // captions_per_image``.
        protocol: ``f30k`` | ``coco5k`` | ``coco1k`` | ``coco1k+5k``.
        captions_per_image: captions per image (5 in the public data).
        fold_images: images per fold of ``coco1k`` (1000; smaller in tests).
        n_folds: number of ``coco1k`` folds (5); the matrix must hold exactly that many folds.
        rerank: MTFN re-ranking (module docstring); ``None`` = the plain figures.
        text_sims: ``[N_cap, N_cap]`` caption-caption matrix for ``rerank.t2i == "text_sim"``
            (default: loaded from ``rerank.text_sims``); sliced per fold.

    Returns:
        ``f30k`` / ``coco5k``: the :func:`~itm.metrics.recall_at_k` dict (Python floats).
        ``coco1k``: the fold-averaged dict plus ``folds`` (list of per-fold dicts).
        ``coco1k+5k``: ``{"coco1k": <coco1k dict>, "coco5k": <coco5k dict>}``.
    """
    key = protocol.strip().lower()
    score = _scorer(rerank, text_sims)
    every = slice(None)
    if key in ("f30k", "coco5k"):
        return score(sims, every, captions_per_image)
    if key == "coco1k":
        return _five_fold(sims, captions_per_image, fold_images, n_folds, score)
    if key == "coco1k+5k":
        return {
            "coco1k": _five_fold(sims, captions_per_image, fold_images, n_folds, score),
            "coco5k": score(sims, every, captions_per_image),
        }
    raise ValueError(f"unknown evaluation protocol {protocol!r}; choose one of {list(PROTOCOLS)}")


def ensemble(matrices: Sequence[Matrix]) -> Matrix:
    """Average the [N_img, N_cap] score matrices of several models (then rank the result).

    Args:
        matrices: non-empty list of same-shape 2-D torch tensors or numpy arrays.

    Returns:
        the element-wise mean: a numpy array if every input is numpy, otherwise a torch tensor
        (on the first tensor's device), in the promoted floating dtype of the inputs.
    """
    if len(matrices) == 0:
        raise ValueError("ensemble needs at least one similarity matrix")
    shapes = [_shape(m) for m in matrices]
    if len(shapes[0]) != 2:
        raise ValueError(f"ensemble expects 2-D [N_img, N_cap] matrices, got shape {shapes[0]}")
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise ValueError(
                f"ensemble needs matrices of the same shape: matrix 0 is {list(shapes[0])} but "
                f"matrix {i} is {list(shape)}"
            )
    if all(isinstance(m, np.ndarray) for m in matrices):
        dtype = np.result_type(np.float32, *matrices)
        total = np.array(matrices[0], dtype=dtype, copy=True)
        for m in matrices[1:]:
            total += m
        total /= len(matrices)
        return total
    device = next(m.device for m in matrices if isinstance(m, Tensor))
    tensors = [torch.as_tensor(m, device=device) for m in matrices]
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    total_t = tensors[0].detach().to(dtype).clone()
    for t in tensors[1:]:
        total_t += t.detach()
    total_t /= len(tensors)
    return total_t
