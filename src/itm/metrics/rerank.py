"""MTFN cross-modal re-ranking of a finished score matrix (docs/mtfn.md).

Wang et al., "Matching Images and Text with Multi-modal Tensor Fusion and Re-ranking" (ACM MM
2019) re-orders the top candidates of each query by how the candidate ranks the query in the
OTHER direction. It needs no parameters and works on any model's matrix ``S [N_img, N_cap]``
(caption ``c`` belongs to image ``c // captions_per_image``). It yields orderings, not scores, so
its figures come from :func:`recall_from_orders`.

With ``pos_t2i[c, i]`` = 0-based position of image ``i`` in caption ``c``'s ranking and
``pos_i2t[i, c]`` = position of caption ``c`` in image ``i``'s ranking:

- i2t: the first ``k_i2t`` captions of image ``i`` are re-sorted by ``pos_t2i[c, i]`` ascending
  (captions that also rank ``i`` high come first); the rest keeps its place.
- t2i: the first ``k_t2i`` images of caption ``c`` are re-sorted by ``min_{g in group(c)}
  pos_i2t[j, g]``, where ``group(c)`` is
  ``oracle_groups``: the captions of ``c``'s own image, as the released script does. That reads
  the test set's ground-truth grouping of captions, which a retrieval system never has: an
  ORACLE, kept only to reproduce the paper's table and labelled so in every output;
  ``text_sim`` (an itm design, no reference exists): ``c`` plus its ``captions_per_image - 1``
  most similar captions under a supplied caption-caption matrix (ties broken by index);
  ``none``: no t2i re-ranking.

Ties: keys are small integers, so equal keys are the rule. itm re-sorts STABLY (equal keys keep
their first-stage order). The released script used ``np.argsort``, whose classic introsort is
an insertion sort (stable) for up to 16 items, so its i2t re-ranking with ``k_i2t = 15`` agrees;
with ``k_t2i = 20`` that introsort partitions and is not stable, so the script's t2i order
differs from the stable one (and on machines where numpy dispatches to a vectorised sort, even
its i2t order depends on the machine).

Cost: ``pos_*`` come from the two first-stage argsorts (O(N_img N_cap log N)), then every
re-sort is a gather and a stable sort of ``k`` keys per query.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itm.metrics.recall import recall_from_ranks

__all__ = [
    "RERANK_T2I",
    "RerankSpec",
    "mtfn_rerank",
    "recall_from_orders",
    "text_neighbours",
]

RERANK_T2I = ("none", "oracle_groups", "text_sim")


def _numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x)}") from err


def _inverse(order: np.ndarray) -> np.ndarray:
    """Row-wise inverse permutation: ``pos[r, order[r, j]] = j`` (smallest integer dtype)."""
    dtype = np.uint16 if order.shape[1] <= np.iinfo(np.uint16).max else np.int32
    pos = np.empty(order.shape, dtype=dtype)
    np.put_along_axis(pos, order, np.arange(order.shape[1], dtype=dtype)[None, :], axis=1)
    return pos


def _resort(order: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """``order`` with its first ``k`` columns re-sorted by ``keys [rows, k]``, stably."""
    out = order.copy()
    perm = np.argsort(keys, axis=1, kind="stable")
    out[:, :k] = np.take_along_axis(order[:, :k], perm, axis=1)
    return out


def text_neighbours(text_sims: Any, n: int, block_mb: float = 64.0) -> np.ndarray:
    """For each caption, itself followed by its ``n`` most similar OTHER captions.

    Args:
        text_sims: ``[N_cap, N_cap]`` caption-caption similarities (numpy, memory map or tensor;
            read in row blocks of about ``block_mb``).
        n: neighbours per caption (``captions_per_image - 1`` for MTFN's ``text_sim``).
        block_mb: memory of one row block.

    Returns:
        int64 ``[N_cap, n + 1]``; ties are broken by the lower caption index.
    """
    sims = text_sims if not isinstance(text_sims, torch.Tensor) else _numpy(text_sims, "text_sims")
    n_cap = sims.shape[0]
    if sims.ndim != 2 or sims.shape[1] != n_cap:
        raise ValueError(f"text_sims must be a square [N_cap, N_cap] matrix, got {sims.shape}")
    if not 0 <= n < n_cap:
        raise ValueError(f"need 0 <= neighbours < N_cap = {n_cap}, got {n}")
    out = np.empty((n_cap, n + 1), dtype=np.int64)
    out[:, 0] = np.arange(n_cap)
    rows = max(1, int(block_mb * 2**20) // (16 * n_cap))
    for r0 in range(0, n_cap, rows):
        block = np.array(sims[r0 : r0 + rows], dtype=np.float64)  # [r, N_cap] copy
        if np.isnan(block).any():
            raise ValueError("text_sims contains NaN")
        r = block.shape[0]
        block[np.arange(r), r0 + np.arange(r)] = -np.inf  # a caption is not its own neighbour
        out[r0 : r0 + r, 1:] = np.argsort(-block, axis=1, kind="stable")[:, :n]
    return out


def mtfn_rerank(
    sims: Any,
    k_i2t: int = 15,
    k_t2i: int = 20,
    t2i: str = "none",
    text_sims: Any = None,
    captions_per_image: int = 5,
) -> dict[str, np.ndarray]:
    """MTFN re-ranking of a score matrix (module docstring).

    Args:
        sims: ``[N_img, N_cap]`` scores (numpy array or tensor); caption ``c`` belongs to image
            ``c // captions_per_image``.
        k_i2t: captions re-sorted per image (15, the released script's value).
        k_t2i: images re-sorted per caption (20).
        t2i: ``none`` | ``oracle_groups`` (ORACLE: reads the ground-truth caption groups) |
            ``text_sim`` (groups from ``text_sims``).
        text_sims: ``[N_cap, N_cap]`` caption-caption similarities, for ``t2i="text_sim"``.
        captions_per_image: captions per image.

    Returns:
        ``{"i2t": int64 [N_img, N_cap] caption indices per image, best first; "t2i": int64
        [N_cap, N_img] image indices per caption, best first}``: full permutations, the
        first-stage order (descending score, ties by index) with only the first ``k`` of each
        row re-sorted (stably).
    """
    s = _numpy(sims, "sims")
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"sims must be a non-empty 2-D [N_img, N_cap] matrix, got {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    n_img, n_cap = s.shape
    if captions_per_image < 1 or n_cap != n_img * captions_per_image:
        raise ValueError(
            f"sims has {n_img} images x {n_cap} captions; MTFN re-ranking needs caption c of "
            f"image c // {captions_per_image}, i.e. {n_img * captions_per_image} captions"
        )
    if np.isnan(s).any():
        raise ValueError("sims contains NaN; rankings are undefined")
    if t2i not in RERANK_T2I:
        raise ValueError(f"t2i must be one of {RERANK_T2I}, got {t2i!r}")
    if (t2i == "text_sim") != (text_sims is not None):
        raise ValueError(
            "t2i='text_sim' needs text_sims [N_cap, N_cap]"
            if text_sims is None
            else f"text_sims is read only with t2i='text_sim' (got t2i={t2i!r})"
        )
    for name, k in (("k_i2t", k_i2t), ("k_t2i", k_t2i)):
        if int(k) != k or k < 1:
            raise ValueError(f"{name} must be a positive integer, got {k!r}")
    neg = -s
    i2t0 = np.argsort(neg, axis=1, kind="stable")  # [N_img, N_cap] first-stage orders
    t2i0 = np.argsort(neg.T, axis=1, kind="stable")  # [N_cap, N_img]
    del neg

    # i2t: key of caption c for image i = position of i in c's image ranking
    k1 = min(int(k_i2t), n_cap)
    cand = i2t0[:, :k1]  # [N_img, k1]
    keys = _inverse(t2i0)[cand, np.arange(n_img)[:, None]]  # [N_img, k1]
    i2t = _resort(i2t0, keys, k1)
    del keys

    if t2i == "none":
        return {"i2t": i2t, "t2i": t2i0}
    # t2i: key of image j for caption c = best position of c's group in j's caption ranking
    k2 = min(int(k_t2i), n_img)
    cand = t2i0[:, :k2]  # [N_cap, k2]
    pos_i2t = _inverse(i2t0)  # [N_img, N_cap]
    if t2i == "oracle_groups":
        group_best = pos_i2t.reshape(n_img, n_img, captions_per_image).min(axis=2)  # [j, group]
        keys = group_best[cand, (np.arange(n_cap) // captions_per_image)[:, None]]
    else:
        if tuple(text_sims.shape) != (n_cap, n_cap):
            raise ValueError(
                f"text_sims must be [{n_cap}, {n_cap}] (the captions of sims), got "
                f"{tuple(text_sims.shape)}"
            )
        groups = text_neighbours(text_sims, captions_per_image - 1)  # [N_cap, cpi]
        keys = pos_i2t[cand[:, :, None], groups[:, None, :]].min(axis=2)  # [N_cap, k2]
    return {"i2t": i2t, "t2i": _resort(t2i0, keys, k2)}


def recall_from_orders(
    i2t_order: Any, t2i_order: Any, captions_per_image: int = 5
) -> dict[str, float]:
    """Recall figures of ranked lists (the dict of :func:`~itm.metrics.recall_at_k`).

    Args:
        i2t_order: ``[N_img, N_cap]`` caption indices per image, best first.
        t2i_order: ``[N_cap, N_img]`` image indices per caption, best first.
        captions_per_image: caption ``c`` belongs to image ``c // captions_per_image``.

    The i2t rank of image ``i`` is the first position holding one of its captions; the t2i rank
    of caption ``c`` is the position of its image. ``recall_at_k(S)`` equals this on the plain
    argsorts of ``S`` (when ``S`` has no ties).
    """
    a, b = _numpy(i2t_order, "i2t_order"), _numpy(t2i_order, "t2i_order")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"orders must be 2-D, got shapes {a.shape} and {b.shape}")
    n_img, n_cap = a.shape
    if captions_per_image < 1 or n_cap != n_img * captions_per_image:
        raise ValueError(
            f"i2t_order is [{n_img}, {n_cap}]; with captions_per_image={captions_per_image} it "
            f"must be [N_img, {captions_per_image} N_img]"
        )
    if b.shape != (n_cap, n_img):
        raise ValueError(
            f"t2i_order must be [{n_cap}, {n_img}] (one row of image indices per caption), got "
            f"{list(b.shape)}" + (" (the transposed layout?)" if b.shape == (n_img, n_cap) else "")
        )
    hit_i = a // captions_per_image == np.arange(n_img)[:, None]  # [N_img, N_cap]
    hit_t = b == (np.arange(n_cap) // captions_per_image)[:, None]  # [N_cap, N_img]
    for name, hit in (("i2t_order", hit_i), ("t2i_order", hit_t)):
        missing = np.flatnonzero(~hit.any(axis=1))
        if missing.size:
            raise ValueError(
                f"{name} row {int(missing[0])} never lists its ground truth: rows must be "
                "permutations of all candidates"
            )
    return recall_from_ranks(hit_i.argmax(axis=1), hit_t.argmax(axis=1))


@dataclass(frozen=True)
class RerankSpec:
    """A validated ``eval.rerank`` node (see :meth:`from_config`)."""

    k_i2t: int = 15
    k_t2i: int = 20
    t2i: str = "none"
    text_sims: str | None = None

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> RerankSpec | None:
        """``None`` when ``method`` is null (re-ranking off), else the spec. Fields: ``method``
        (null | mtfn), ``k_i2t`` (15), ``k_t2i`` (20), ``t2i`` (none | oracle_groups |
        text_sim), ``text_sims`` (a ``.npy`` [N_cap, N_cap] path, for ``text_sim``)."""
        if not node or node.get("method") in (None, "", "null", "none"):
            return None
        method = str(node.get("method")).lower()
        if method != "mtfn":
            raise ValueError(f"eval.rerank.method must be null or mtfn, got {method!r}")
        t2i = str(node.get("t2i") or "none")
        if t2i not in RERANK_T2I:
            raise ValueError(f"eval.rerank.t2i must be one of {RERANK_T2I}, got {t2i!r}")
        path = node.get("text_sims")
        if t2i == "text_sim" and not path:
            raise ValueError("eval.rerank.t2i=text_sim needs eval.rerank.text_sims=FILE.npy")
        if path and t2i != "text_sim":
            raise ValueError(f"eval.rerank.text_sims is read only with t2i=text_sim, got {t2i}")
        if path and not Path(str(path)).is_file():
            raise ValueError(f"eval.rerank.text_sims: file not found: {path}")
        spec = cls(int(node.get("k_i2t", 15)), int(node.get("k_t2i", 20)), t2i, path or None)
        if spec.k_i2t < 1 or spec.k_t2i < 1:
            raise ValueError(f"eval.rerank.k_i2t / k_t2i must be >= 1, got {spec}")
        return spec

    @property
    def oracle(self) -> bool:
        """True for ``oracle_groups``: its t2i figures read the ground-truth caption groups."""
        return self.t2i == "oracle_groups"

    @property
    def label(self) -> str:
        """A one-line description for tables and logs (says ORACLE where it is one)."""
        text = f"MTFN re-ranking (k_i2t {self.k_i2t}, k_t2i {self.k_t2i}, t2i {self.t2i}"
        if self.oracle:
            text += "; ORACLE: t2i reads the test set's ground-truth caption groups"
        return text + ")"

    def load_text_sims(self) -> np.ndarray | None:
        """The caption-caption matrix (memory-mapped), or ``None``."""
        return None if self.text_sims is None else np.load(self.text_sims, mmap_mode="r")

    def recall(
        self, sims: Any, captions_per_image: int = 5, text_sims: Any = None
    ) -> dict[str, float]:
        """The recall dict of the re-ranked orders of ``sims`` (``text_sims``: the matrix for
        ``text_sim``, already restricted to the captions of ``sims``)."""
        orders = mtfn_rerank(
            sims,
            self.k_i2t,
            self.k_t2i,
            self.t2i,
            text_sims if self.t2i == "text_sim" else None,
            captions_per_image,
        )
        return recall_from_orders(orders["i2t"], orders["t2i"], captions_per_image)
