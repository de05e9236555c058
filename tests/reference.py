"""Independent, deliberately naive NumPy references (one pair at a time, attended vectors
materialised, only valid fragments ever sliced), used to check the batched heads."""

from __future__ import annotations

import numpy as np


def lrelu(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x, 0.1 * x)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def feature_norm(a: np.ndarray, kind: str) -> np.ndarray:
    """``a [context, query]`` normalised across the query axis (axis 1)."""
    if kind == "clipped_l2norm":
        a = lrelu(a)
        return a / (np.sqrt((a**2).sum(1, keepdims=True)) + 1e-8)
    if kind == "l2norm":
        return a / (np.sqrt((a**2).sum(1, keepdims=True)) + 1e-8)
    if kind == "clipped":
        return lrelu(a)
    if kind == "softmax":
        return softmax(a, 1)
    if kind == "no_norm":
        return a
    raise ValueError(kind)


def attend(query: np.ndarray, context: np.ndarray, kind: str, lam: float):
    """Returns (weights [query, context], attended [query, d])."""
    a = context @ query.T  # [context, query]
    w = softmax(lam * feature_norm(a, kind).T, 1)  # [query, context]
    return w, w @ context


def cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    num = (x * y).sum(-1)
    den = np.maximum(np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1), 1e-8)
    return num / den


def pool(x: np.ndarray, kind: str, lam: float = 6.0) -> float:
    if kind == "avg":
        return float(x.mean())
    if kind == "max":
        return float(x.max())
    if kind == "sum":
        return float(x.sum())
    if kind == "lse":
        return float(np.log(np.exp(lam * x).sum()) / lam)
    raise ValueError(kind)


def scan_scores(img, img_lens, cap, cap_lens, direction, lam, kind, pooling, lam_lse=6.0):
    """SCAN similarity [n_img, n_cap] by a loop over pairs."""
    out = np.zeros((len(img), len(cap)))
    for i in range(len(img)):
        v = img[i, : img_lens[i]]
        for j in range(len(cap)):
            e = cap[j, : cap_lens[j]]
            total = 0.0
            if direction in ("t2i", "both"):
                _, att = attend(e, v, kind, lam)
                total += pool(cosine(e, att), pooling, lam_lse)
            if direction in ("i2t", "both"):
                _, att = attend(v, e, kind, lam)
                total += pool(cosine(v, att), pooling, lam_lse)
            out[i, j] = total
    return out


def random_sets(rng, n, size, d, lens, garbage=True):
    """Unit-norm valid fragments; padded slots hold large garbage (or zeros)."""
    x = rng.standard_normal((n, size, d))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    for b, n_valid in enumerate(lens):
        x[b, n_valid:] = rng.standard_normal((size - n_valid, d)) * 7.0 if garbage else 0.0
    return x
