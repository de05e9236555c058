"""Hardest negatives over the GLOBAL batch under DDP (``model.loss_gather=true``).

Per rank, plain DDP scores only its own ``b x b`` batch, so every hardest negative comes from
``b - 1`` candidates. With loss gathering each rank all-gathers the fragment embeddings of every
rank (with gradients: ``all_gather(..., sync_grads=True)``), scores its LOCAL images against ALL
``B = sum_r b_r`` captions (``[b, B]``) and ALL images against its LOCAL captions (``[B, b]``), and
takes the hinge loss over those rows and columns. Summed over ranks this is exactly the
single-process loss of the global batch (``ContrastiveLoss`` on the ``[B, B]`` matrix), and the
gradient that reaches each rank's embeddings is that loss's gradient; DDP then averages the
parameter gradients over ranks (so the update is the global-batch gradient divided by the world
size, the same convention as plain DDP).

Effect: the negatives of each positive come from the global batch (``B - 1`` instead of
``b - 1``), so hardest negatives are harder -- it behaves like training with a W times larger
batch for the loss, which matters for VSE++-style hardest-negative losses, whose results depend on
the batch size. Cost: each rank scores ``2 b B`` pairs instead of ``b^2`` (``2 W`` times the
cross-attention work and activation memory of the loss) plus two all-gathers of the fragment
embeddings per step.

Duplicates: Lightning's ``DistributedSampler`` pads the last round with repeated samples; a pair
whose caption is the SAME sample as the positive (equal ``cap_ids``) is never used as a negative.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from itm.models.functional import loss_precision

__all__ = ["AllGather", "cross_rank_hinge", "gather_rows", "gathered_contrastive_loss"]

#: ``all_gather(tensor, sync_grads) -> [world, *tensor.shape]`` (Lightning's
#: ``LightningModule.all_gather`` signature, with gradients when ``sync_grads``).
AllGather = Callable[..., Tensor]


def gather_rows(x: Tensor, all_gather: AllGather, sync_grads: bool) -> tuple[Tensor, list[int]]:
    """All-gather tensors whose sizes may differ between ranks in every axis but the last.

    Args:
        x: this rank's ``[b, ...]`` tensor.
        all_gather: see :data:`AllGather`.
        sync_grads: keep gradients through the gather.

    Returns:
        (``[sum_r b_r, *max sizes]`` rows of all ranks in rank order, padded with zeros in the
        inner axes; the list of ``b_r``).
    """
    shape = torch.tensor(list(x.shape), device=x.device, dtype=torch.int64)
    shapes = all_gather(shape, sync_grads=False).reshape(-1, x.dim())
    sizes = [int(s) for s in shapes[:, 0].tolist()]
    target = shapes.max(dim=0).values.tolist()
    pad: list[int] = []
    for axis in reversed(range(x.dim())):
        pad += [0, int(target[axis]) - x.shape[axis]]
    if any(pad):
        x = F.pad(x, pad)
    gathered = all_gather(x, sync_grads=sync_grads).reshape(-1, *x.shape)
    return torch.cat([gathered[r, : sizes[r]] for r in range(len(sizes))]), sizes


def cross_rank_hinge(
    rows: Tensor,
    cols: Tensor,
    offset: int,
    margin: float,
    max_violation: bool,
    row_mask: Tensor | None = None,
    col_mask: Tensor | None = None,
) -> Tensor:
    """The hinge loss of a rank's rows and columns of the global ``[B, B]`` score matrix.

    Args:
        rows: ``[b, B]`` local images x all captions; the positive of row ``i`` is column
            ``offset + i``.
        cols: ``[B, b]`` all images x local captions; the positive of column ``j`` is row
            ``offset + j``.
        offset: index of this rank's first sample in the global batch.
        margin: hinge margin.
        max_violation: hardest negative only (else the sum over negatives).
        row_mask, col_mask: optional bool masks (same shapes) of pairs that are not negatives.

    Returns:
        the sum over local images of their caption-negative costs plus the sum over local
        captions of their image-negative costs (``ContrastiveLoss`` restricted to these rows /
        columns).
    """
    b = rows.shape[0]
    ar = torch.arange(b, device=rows.device)
    pos_r = rows[ar, offset + ar]
    pos_c = cols[offset + ar, ar]
    cost_c = (margin + rows - pos_r[:, None]).clamp(min=0)
    cost_i = (margin + cols - pos_c[None, :]).clamp(min=0)
    m_r = torch.zeros_like(cost_c, dtype=torch.bool)
    m_r[ar, offset + ar] = True
    m_c = torch.zeros_like(cost_i, dtype=torch.bool)
    m_c[offset + ar, ar] = True
    if row_mask is not None:
        m_r |= row_mask
    if col_mask is not None:
        m_c |= col_mask
    cost_c = cost_c.masked_fill(m_r, 0.0)
    cost_i = cost_i.masked_fill(m_c, 0.0)
    if max_violation:
        return cost_c.max(dim=1).values.sum() + cost_i.max(dim=0).values.sum()
    return cost_c.sum() + cost_i.sum()


def gathered_contrastive_loss(
    score: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
    img: Tensor,
    img_lens: Tensor,
    cap: Tensor,
    cap_lens: Tensor,
    *,
    all_gather: AllGather,
    rank: int,
    margin: float,
    max_violation: bool,
    cap_ids: Tensor | None = None,
    img_ids: Tensor | None = None,
    mask_false_negatives: bool = False,
) -> tuple[Tensor, int]:
    """This rank's share of the contrastive loss of the global batch (see the module docstring).

    Args:
        score: ``score(img, img_lens, cap, cap_lens) -> [n_img, n_cap]`` (``Similarity``).
        img, img_lens: local image fragment embeddings ``[b, K, d]`` and lengths ``[b]``.
        cap, cap_lens: local caption fragment embeddings ``[b, L, d]`` and lengths ``[b]``
            (caption ``i`` is the positive of image ``i``).
        all_gather: see :data:`AllGather`.
        rank: this rank's index in the gather order.
        margin, max_violation: the hinge loss's settings.
        cap_ids: ``[b]`` dataset ids of the pairs (equal ids = the same sample, never a
            negative of itself: DistributedSampler padding).
        img_ids: ``[b]`` image ids (with ``mask_false_negatives``: a caption of the same image
            is not a negative, as ``ContrastiveLoss(mask_false_negatives=True)``).

    Returns:
        (loss, global batch size ``B``).
    """
    img_all, sizes = gather_rows(img, all_gather, sync_grads=True)
    cap_all, _ = gather_rows(cap, all_gather, sync_grads=True)
    img_lens_all, _ = gather_rows(img_lens, all_gather, sync_grads=False)
    cap_lens_all, _ = gather_rows(cap_lens, all_gather, sync_grads=False)
    offset = sum(sizes[:rank])
    # float32 for the loss, also when the head ran under bf16 / fp16 autocast
    rows = loss_precision(score(img, img_lens, cap_all, cap_lens_all))  # [b, B]
    cols = loss_precision(score(img_all, img_lens_all, cap, cap_lens))  # [B, b]
    row_mask = col_mask = None
    if cap_ids is not None:
        ids_all, _ = gather_rows(cap_ids, all_gather, sync_grads=False)
        row_mask = cap_ids[:, None] == ids_all[None, :]
        col_mask = ids_all[:, None] == cap_ids[None, :]
    if mask_false_negatives and img_ids is not None:
        img_all_ids, _ = gather_rows(img_ids, all_gather, sync_grads=False)
        same_r = img_ids[:, None] == img_all_ids[None, :]
        same_c = img_all_ids[:, None] == img_ids[None, :]
        row_mask = same_r if row_mask is None else row_mask | same_r
        col_mask = same_c if col_mask is None else col_mask | same_c
    loss = cross_rank_hinge(rows, cols, offset, margin, max_violation, row_mask, col_mask)
    return loss, sum(sizes)
