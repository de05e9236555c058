"""Bidirectional retrieval recall (docs/evaluation.md).

Conventions: a similarity matrix ``sims`` is laid out [N_img, N_cap] (rows = images, columns =
captions); ``cap_to_img`` [N_cap] gives the image each caption belongs to (by default caption ``c``
belongs to image ``c // captions_per_image``, the file order of the public data).

Ranks are 0-based and computed with a PESSIMISTIC tie rule, so that a degenerate model cannot
score well by producing ties:

- i2t rank of image ``i`` = number of captions NOT belonging to ``i`` whose score in row ``i`` is
  ``>=`` the best score of ``i``'s own captions;
- t2i rank of caption ``c`` = number of OTHER images whose score in column ``c`` is ``>=`` the
  score of the caption's true image.

Without ties these equal the references' ranks (position of the best positive in the row sorted
descending / of the true image in the column sorted descending); a constant matrix gives the worst
possible ranks (``N_cap - n_pos(i)`` and ``N_img - 1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "METRIC_KEYS",
    "CrossModalRecall",
    "ranks_i2t_t2i",
    "recall_at_k",
    "recall_from_ranks",
]

#: Keys of every recall dict, in logging order.
METRIC_KEYS: tuple[str, ...] = (
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "i2t_medr",
    "i2t_meanr",
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "t2i_medr",
    "t2i_meanr",
    "rsum",
)

_KS = (1, 5, 10)

ArrayLike = Tensor | np.ndarray


def _as_tensor(x: ArrayLike | Sequence[Any], name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a torch tensor or a numpy array, got {type(x)}") from err


def default_cap_to_img(n_img: int, n_cap: int, captions_per_image: int) -> Tensor:
    """[N_cap] int64 mapping ``c -> c // captions_per_image`` after checking the layout."""
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if n_cap != n_img * captions_per_image:
        raise ValueError(
            f"similarity matrix has {n_img} images x {n_cap} captions, but with "
            f"captions_per_image={captions_per_image} it must have "
            f"{n_img * captions_per_image} captions (caption c belongs to image "
            f"c // {captions_per_image}); pass cap_to_img for another layout"
        )
    return torch.arange(n_cap, dtype=torch.long) // captions_per_image


def _check_cap_to_img(cap_to_img: ArrayLike | Sequence[int], n_img: int, n_cap: int) -> Tensor:
    """Validate an explicit caption -> image mapping; returns it as [N_cap] int64."""
    mapping = _as_tensor(cap_to_img, "cap_to_img")
    if mapping.dim() != 1 or mapping.shape[0] != n_cap:
        raise ValueError(
            f"cap_to_img must have shape [{n_cap}] (one image index per caption column), got "
            f"{tuple(mapping.shape)}"
        )
    if mapping.is_floating_point() or mapping.is_complex() or mapping.dtype == torch.bool:
        raise ValueError(f"cap_to_img must hold integer image indices, got dtype {mapping.dtype}")
    mapping = mapping.long()
    if n_cap and (int(mapping.min()) < 0 or int(mapping.max()) >= n_img):
        raise ValueError(
            f"cap_to_img values must lie in [0, {n_img}) for {n_img} images, got range "
            f"[{int(mapping.min())}, {int(mapping.max())}]"
        )
    counts = torch.bincount(mapping.cpu(), minlength=n_img)
    missing = torch.nonzero(counts == 0).flatten()
    if missing.numel():
        raise ValueError(
            f"{missing.numel()} image(s) have no caption in cap_to_img (first: "
            f"{missing[:5].tolist()}); every image needs at least one caption to be ranked"
        )
    return mapping


@torch.no_grad()
def ranks_i2t_t2i(
    sims: Tensor, cap_to_img: Tensor, *, max_block_mb: float = 64.0
) -> tuple[Tensor, Tensor]:
    """0-based retrieval ranks in both directions (pessimistic ties, see the module docstring).

    The matrix is scanned in blocks of rows so that the temporary memory stays within about
    ``max_block_mb`` (a few boolean [rows, N_cap] blocks), whatever the matrix size; a 5000 x
    25000 matrix needs no full-size temporary.

    Args:
        sims: [N_img, N_cap] float scores (any device; NaN is rejected).
        cap_to_img: [N_cap] int, image index of each caption; every image needs >= 1 caption.
        max_block_mb: memory budget of the temporary blocks, in MiB.

    Returns:
        ``(i2t_ranks [N_img], t2i_ranks [N_cap])``, int64 on ``sims.device``.
    """
    sims = _as_tensor(sims, "sims").detach()
    if sims.dim() != 2:
        raise ValueError(f"sims must be a 2-D [N_img, N_cap] matrix, got shape {tuple(sims.shape)}")
    if not sims.is_floating_point():
        sims = sims.double()
    n_img, n_cap = sims.shape
    if n_img == 0 or n_cap == 0:
        raise ValueError(f"sims must be non-empty, got shape {tuple(sims.shape)}")
    device = sims.device
    mapping = _check_cap_to_img(cap_to_img, n_img, n_cap).to(device)  # [N_cap]
    cols = torch.arange(n_cap, device=device)

    pos_scores = sims[mapping, cols]  # [N_cap] score of each caption with its own image
    if torch.isnan(pos_scores).any():
        raise ValueError("sims contains NaN; ranks are undefined")
    best_pos = torch.full((n_img,), -math.inf, dtype=sims.dtype, device=device)
    best_pos = best_pos.scatter_reduce(0, mapping, pos_scores, reduce="amax")  # [N_img]
    # positives of image i that reach its best positive score (>= 1: the best one itself);
    # they are counted by the row comparison below and are not negatives
    pos_at_best = torch.zeros(n_img, dtype=torch.long, device=device)
    pos_at_best.scatter_add_(0, mapping, (pos_scores >= best_pos[mapping]).long())

    i2t = torch.empty(n_img, dtype=torch.long, device=device)
    t2i = torch.zeros(n_cap, dtype=torch.long, device=device)
    # per block: one boolean [rows, N_cap] comparison plus the int32 copy its sum makes on CPU
    bytes_per_row = n_cap * 6
    rows_per_block = max(1, int(max_block_mb * 2**20) // bytes_per_row)
    for start in range(0, n_img, rows_per_block):
        block = sims[start : start + rows_per_block]  # [r, N_cap] view
        if torch.isnan(block).any():
            raise ValueError("sims contains NaN; ranks are undefined")
        ge_best = block >= best_pos[start : start + rows_per_block].unsqueeze(1)  # [r, N_cap]
        i2t[start : start + rows_per_block] = ge_best.sum(dim=1, dtype=torch.int32)
        del ge_best
        t2i += (block >= pos_scores.unsqueeze(0)).sum(dim=0, dtype=torch.int32)  # [N_cap]
    i2t -= pos_at_best
    t2i -= 1  # the true image itself (always >= its own score)
    return i2t, t2i


def _median_numpy(values: Tensor) -> float:
    """Median with numpy semantics (mean of the two middle values for even counts)."""
    ordered = torch.sort(values.double().flatten()).values
    n = ordered.numel()
    mid = n // 2
    if n % 2:
        return float(ordered[mid])
    return float((ordered[mid - 1] + ordered[mid]) / 2)


def _direction_metrics(ranks: Tensor, prefix: str) -> dict[str, float]:
    ranks = ranks.detach().double().flatten().cpu()
    if ranks.numel() == 0:
        raise ValueError(f"no {prefix} ranks to summarise")
    out = {f"{prefix}_r{k}": 100.0 * float((ranks < k).double().mean()) for k in _KS}
    out[f"{prefix}_medr"] = float(math.floor(_median_numpy(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(ranks.mean()) + 1.0
    return out


def recall_from_ranks(i2t_ranks: ArrayLike, t2i_ranks: ArrayLike) -> dict[str, float]:
    """Summarise 0-based ranks into R@1/5/10, median and mean rank, and rsum.

    R@K = 100 * fraction(rank < K); medr = floor(median(rank)) + 1 (numpy median: for an even
    count the mean of the two middle values, then floored); meanr = mean(rank) + 1; rsum = sum of
    the six R@K.

    Args:
        i2t_ranks: [N_img] 0-based ranks (tensor or numpy array, any numeric dtype).
        t2i_ranks: [N_cap] 0-based ranks.

    Returns:
        dict of Python floats keyed as ``METRIC_KEYS``.
    """
    metrics = _direction_metrics(_as_tensor(i2t_ranks, "i2t_ranks"), "i2t")
    metrics.update(_direction_metrics(_as_tensor(t2i_ranks, "t2i_ranks"), "t2i"))
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in _KS)
    return {key: metrics[key] for key in METRIC_KEYS}


def recall_at_k(
    sims: ArrayLike,
    captions_per_image: int = 5,
    cap_to_img: ArrayLike | Sequence[int] | None = None,
    *,
    max_block_mb: float = 64.0,
) -> dict[str, float]:
    """Image->text and text->image recall of a full similarity matrix.

    Args:
        sims: [N_img, N_cap] torch tensor or numpy array (rows = images, columns = captions).
        captions_per_image: with ``cap_to_img=None``, caption ``c`` belongs to image
            ``c // captions_per_image`` and ``N_cap`` must equal ``N_img * captions_per_image``.
        cap_to_img: optional explicit [N_cap] caption -> image mapping (overrides the above).
        max_block_mb: temporary memory budget of the rank computation, in MiB.

    Returns:
        dict of Python floats with keys ``i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr t2i_r1 t2i_r5
        t2i_r10 t2i_medr t2i_meanr rsum``.
    """
    sims_t = _as_tensor(sims, "sims")
    if sims_t.dim() != 2:
        raise ValueError(
            f"sims must be a 2-D [N_img, N_cap] matrix, got shape {tuple(sims_t.shape)}"
        )
    n_img, n_cap = sims_t.shape
    if cap_to_img is None:
        mapping = default_cap_to_img(n_img, n_cap, captions_per_image)
    else:
        mapping = _as_tensor(cap_to_img, "cap_to_img")
    i2t, t2i = ranks_i2t_t2i(sims_t, mapping, max_block_mb=max_block_mb)
    return recall_from_ranks(i2t, t2i)


class CrossModalRecall(Metric):
    """Recall of a similarity matrix that arrives as row slices, possibly from several processes.

    (Named so as not to shadow ``torchmetrics.retrieval.RetrievalRecall``, a per-query recall
    of another kind: this one ranks a whole cross-modal [N_img, N_cap] matrix both ways.)

    Each ``update`` receives some rows of the full [N_img, N_cap] matrix together with the global
    image index of every row. Rows may come in any order, from any rank, and may be repeated (the
    padding duplicates of a ``DistributedSampler``): ``compute`` concatenates all ranks' rows
    (``cat`` states), keeps the FIRST occurrence of every image id, orders the rows by id, checks
    that ids ``0 .. N_img-1`` are each present, and ranks the matrix exactly as
    :func:`recall_at_k` does, so the result is identical to the single-process value.

    Caption -> image mapping (which caption columns are positives of which image), by priority:

    1. ``update(..., cap_to_img=...)``: a mapping for the current accumulation (e.g. a
       split-specific one); every update that passes one must pass the same; forgotten by
       ``reset()``. It describes the whole caption axis, so every rank passes the full mapping
       and it is not synchronised.
    2. ``cap_to_img`` given to the constructor.
    3. otherwise caption ``c`` belongs to image ``c // captions_per_image``, and
       ``N_img = N_cap // captions_per_image`` (``N_cap`` must be divisible).

    ``N_img`` is ``max(cap_to_img) + 1`` with an explicit mapping. Call ``update`` and
    ``compute``; ``forward`` (the per-batch value) is meaningless for a partial matrix.

    Memory: after synchronisation every process holds the full matrix (rows x N_cap of the input
    dtype, plus duplicates); ranking then needs only ``max_block_mb`` of temporaries.

    ``compute`` returns a dict of 0-dim float64 tensors (on the metric's device) with the keys of
    :func:`recall_at_k`. With ``rerank`` (a :class:`~itm.metrics.rerank.RerankSpec`, or an
    ``eval.rerank`` node), it adds the figures of the MTFN-re-ranked orders of the SAME gathered
    matrix under ``rr_<key>`` (computed once on the full matrix, never per shard; the default
    caption layout only), plus ``rr_oracle`` = 1 when the t2i re-ranking is the
    ``oracle_groups`` oracle.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    rows: list[Tensor] | Tensor
    img_ids: list[Tensor] | Tensor

    def __init__(
        self,
        captions_per_image: int = 5,
        cap_to_img: ArrayLike | Sequence[int] | None = None,
        max_block_mb: float = 64.0,
        rerank: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        from itm.metrics.rerank import RerankSpec

        self.rerank = rerank if isinstance(rerank, RerankSpec) else RerankSpec.from_config(rerank)
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
        self.captions_per_image = int(captions_per_image)
        self.max_block_mb = float(max_block_mb)
        self._cap_to_img_init = self._as_mapping(cap_to_img) if cap_to_img is not None else None
        self._cap_to_img_update: Tensor | None = None
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.add_state("img_ids", default=[], dist_reduce_fx="cat")

    @staticmethod
    def _as_mapping(cap_to_img: ArrayLike | Sequence[int]) -> Tensor:
        mapping = _as_tensor(cap_to_img, "cap_to_img")
        if mapping.dim() != 1 or mapping.is_floating_point():
            raise ValueError(
                "cap_to_img must be a 1-D integer [N_cap] tensor, got "
                f"shape {tuple(mapping.shape)} dtype {mapping.dtype}"
            )
        return mapping.detach().long().cpu()

    def update(
        self,
        sims_rows: Tensor,
        img_ids: Tensor,
        cap_to_img: ArrayLike | Sequence[int] | None = None,
    ) -> None:
        """Accumulate rows of the similarity matrix.

        Args:
            sims_rows: [n, N_cap] scores of ``n`` images against ALL captions.
            img_ids: [n] int, global image index (row of the full matrix) of each row.
            cap_to_img: optional [N_cap] caption -> image mapping (see the class docstring).
        """
        if sims_rows.dim() != 2:
            raise ValueError(
                f"sims_rows must be a 2-D [n, N_cap] block, got shape {tuple(sims_rows.shape)}"
            )
        img_ids = torch.as_tensor(img_ids, device=sims_rows.device)
        if img_ids.dim() != 1 or img_ids.shape[0] != sims_rows.shape[0]:
            raise ValueError(
                f"img_ids must have shape [{sims_rows.shape[0]}] (one id per row of sims_rows), "
                f"got {tuple(img_ids.shape)}"
            )
        if img_ids.is_floating_point():
            raise ValueError(f"img_ids must be integers, got dtype {img_ids.dtype}")
        if (
            isinstance(self.rows, list)
            and self.rows
            and self.rows[0].shape[1] != sims_rows.shape[1]
        ):
            raise ValueError(
                f"sims_rows has {sims_rows.shape[1]} caption columns but earlier updates had "
                f"{self.rows[0].shape[1]}"
            )
        if cap_to_img is not None:
            mapping = self._as_mapping(cap_to_img)
            if self._cap_to_img_update is not None and not torch.equal(
                mapping, self._cap_to_img_update
            ):
                raise ValueError(
                    "cap_to_img differs from the one passed to an earlier update since the last "
                    "reset()"
                )
            self._cap_to_img_update = mapping
        self.rows.append(sims_rows.detach())
        self.img_ids.append(img_ids.long())

    def reset(self) -> None:
        """Clear the accumulated rows and the mapping given to ``update``."""
        super().reset()
        self._cap_to_img_update = None

    def _mapping(self, n_cap: int) -> tuple[Tensor, int]:
        """Effective [N_cap] caption -> image mapping and the number of images."""
        mapping = self._cap_to_img_update
        if mapping is None:
            mapping = self._cap_to_img_init
        if mapping is None:
            if n_cap % self.captions_per_image:
                raise ValueError(
                    f"{n_cap} caption columns are not a multiple of captions_per_image="
                    f"{self.captions_per_image}; pass cap_to_img for another layout"
                )
            n_img = n_cap // self.captions_per_image
            return default_cap_to_img(n_img, n_cap, self.captions_per_image), n_img
        if mapping.shape[0] != n_cap:
            raise ValueError(
                f"cap_to_img has {mapping.shape[0]} entries but the rows have {n_cap} caption "
                "columns"
            )
        return mapping, int(mapping.max()) + 1 if n_cap else 0

    def compute(self) -> dict[str, Tensor]:
        """Assemble the matrix in image-id order and compute the recall dict (0-dim tensors)."""
        empty = not self.rows if isinstance(self.rows, list) else self.rows.numel() == 0
        if empty:
            raise ValueError("CrossModalRecall.compute() called before any update()")
        rows = dim_zero_cat(self.rows)  # [M, N_cap], M >= N_img with duplicates
        ids = dim_zero_cat(self.img_ids).to(rows.device)  # [M]
        mapping, n_img = self._mapping(rows.shape[1])

        # first occurrence of every id: stable sort, keep where the id changes
        order = torch.sort(ids, stable=True).indices
        sorted_ids = ids[order]
        first = torch.ones_like(sorted_ids, dtype=torch.bool)
        first[1:] = sorted_ids[1:] != sorted_ids[:-1]
        unique_ids = sorted_ids[first]
        expected = torch.arange(n_img, device=ids.device)
        if unique_ids.shape[0] != n_img or not torch.equal(unique_ids, expected):
            present = torch.zeros(n_img, dtype=torch.bool, device=ids.device)
            in_range = unique_ids[(unique_ids >= 0) & (unique_ids < n_img)]
            present[in_range] = True
            missing = torch.nonzero(~present).flatten()
            extra = unique_ids[(unique_ids < 0) | (unique_ids >= n_img)]
            raise ValueError(
                f"CrossModalRecall expects every image id 0..{n_img - 1} exactly once (after "
                f"removing duplicates); {missing.numel()} missing (first: "
                f"{missing[:10].tolist()}), {extra.numel()} out of range (first: "
                f"{extra[:10].tolist()})"
            )
        matrix = rows[order[first]]  # [N_img, N_cap] in id order
        i2t, t2i = ranks_i2t_t2i(matrix, mapping.to(rows.device), max_block_mb=self.max_block_mb)
        metrics = recall_from_ranks(i2t, t2i)
        if self.rerank is not None:
            metrics.update(self._reranked(matrix, mapping))
        return {
            key: torch.tensor(value, dtype=torch.float64, device=self.device)
            for key, value in metrics.items()
        }

    def _reranked(self, matrix: Tensor, mapping: Tensor) -> dict[str, float]:
        """``rr_*`` figures of the MTFN-re-ranked orders of the full matrix."""
        n_img, n_cap = matrix.shape
        cpi = n_cap // max(n_img, 1)
        if n_cap != n_img * cpi or not torch.equal(
            mapping.cpu(), torch.arange(n_cap) // max(cpi, 1)
        ):
            raise ValueError(
                "MTFN re-ranking needs caption c to belong to image c // captions_per_image "
                "(the public file order); this split is laid out differently"
            )
        spec = self.rerank
        out = {f"rr_{k}": v for k, v in spec.recall(matrix, cpi, spec.load_text_sims()).items()}
        if spec.oracle:
            out["rr_oracle"] = 1.0
        return out
