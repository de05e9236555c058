"""BFAN: bidirectional focal attention (Liu et al., ACM MM 2019), methods.md section 4."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itm.models.align.base import (
    AlignHead,
    check_direction,
    fast_softmax_ok,
    focal_tolerance,
    gram,
    gram_with_ones,
    i2t_cosine,
    i2t_weights,
    region_word_scores,
    sq_norm,
    t2i_cosine,
    t2i_weights,
)
from itm.models.align.scan import caption_cache, scan_block

FOCALS = ("equal", "prob")


def focal_mask(alpha: Tensor, ctx_mask: Tensor, dim: int, focal: str) -> Tensor:
    """Focal selection ``H = [F > 0]`` over the context axis ``dim`` of the weights ``alpha``.

    ``equal``: ``F = S alpha_p - sum_p' alpha_p'`` (``S`` = number of VALID context items, i.e.
    keep what lies above the uniform ``1/S``); ``prob``: ``F = alpha_p sum_p' sqrt(alpha_p') -
    sum_p' alpha_p'^1.5``. Sums run over the valid context (``alpha`` is 0 elsewhere). ``H`` is a
    step function, so it is computed without gradient. Returns bool, False at invalid context.

    Args:
        alpha: attention weights, any layout, softmax-normalised over ``dim`` (0 at invalid
            context items).
        ctx_mask: bool, broadcastable to ``alpha``; True for valid context items.
        dim: the context axis.
        focal: ``equal`` | ``prob``.
    """
    with torch.no_grad():
        a = alpha.detach()
        total = a.sum(dim=dim, keepdim=True)
        if focal == "equal":
            n_ctx = ctx_mask.sum(dim=dim, keepdim=True).to(a.dtype)
            f, scale = n_ctx * a - total, total
        elif focal == "prob":
            root = torch.sqrt(a)
            scale = (a * root).sum(dim=dim, keepdim=True)
            f = a * root.sum(dim=dim, keepdim=True) - scale
        else:
            raise ValueError(f"focal must be one of {FOCALS}, got {focal!r}")
        # every weight tied (F = 0 up to rounding): empty focal set, see focal_tolerance
        clear = f.amax(dim=dim, keepdim=True) > scale * focal_tolerance(a.dtype)
        return (f > 0) & clear & ctx_mask


def focal_weights(alpha: Tensor, ctx_mask: Tensor, dim: int, focal: str) -> Tensor:
    """Renormalised focal weights ``alpha_hat = H alpha / sum_p' H alpha`` over ``dim``.

    Empty focal set (no context item kept: a single valid context item, e.g. a one-word caption
    in i2t or a one-region image in t2i, or all weights exactly equal): the reference divides
    0 by 0 and returns NaN; here that query falls back to its un-focused weights ``alpha``
    (every valid item kept), which is finite and is also the limit of the "all weights
    equal" case. Gradients flow through ``alpha`` only.
    """
    keep = focal_mask(alpha, ctx_mask, dim, focal)
    keep = torch.where(keep.any(dim=dim, keepdim=True), keep, ctx_mask)
    kept = torch.where(keep, alpha, alpha.new_zeros(()))
    # A kept item has F > 0, hence alpha > 0; in the fallback the sum is that of a softmax (~1).
    return kept / kept.sum(dim=dim, keepdim=True)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x [..., N]`` over the valid items of ``mask`` (broadcastable): ``[...]``."""
    mask = mask.expand_as(x)
    total = torch.where(mask, x, x.new_zeros(())).sum(dim=-1)
    return total / mask.sum(dim=-1).clamp_min(1).to(x.dtype)


class BFAN(AlignHead):
    """Bidirectional focal attention: SCAN's attention, then keep only the relevant context.

    Per direction: attention weights as SCAN (``clipped_l2norm`` across the queries, softmax
    with ``lambda_softmax`` over the valid context), focal selection ``F > 0`` (``equal`` or
    ``prob``, see :func:`focal_mask`), renormalisation of the kept weights, then the cosine
    of each query fragment with its attended vector (computed from the shared score tensor and
    the Gram matrices, never materialising ``[B1, B2, L, d]``). The t2i part is the MEAN over the
    caption's valid words, the i2t part the MEAN over the image's valid regions; ``both`` adds
    them (range up to 2).

    Pooling: BFAN defines mean aggregation, so this head does its own mean pooling and IGNORES
    the ``pooling`` module (``owns_pooling`` is True, so :class:`~itm.models.similarity.Similarity`
    does not keep an unused copy of it, e.g. parameters of ``gpo`` that would get no gradient).

    Empty focal set: a query whose focal set is empty (see :func:`focal_weights`) uses its
    un-focused weights instead of the reference's NaN.

    Memory: about five live ``[K, L]`` buffers per pair at the peak (measured, either focal),
    within the base class's default :meth:`bytes_per_pair` estimate of six.

    Args:
        focal: ``equal`` (default) | ``prob``.
        lambda_softmax: inverse temperature of the attention softmax (20 in both directions).
        direction: ``t2i`` | ``i2t`` | ``both`` (default).
    """

    owns_pooling = True

    def __init__(
        self, focal: str = "equal", lambda_softmax: float = 20.0, direction: str = "both"
    ) -> None:
        super().__init__()
        if focal not in FOCALS:
            raise ValueError(f"focal must be one of {FOCALS}, got {focal!r}")
        self.focal = focal
        self.lambda_softmax = float(lambda_softmax)
        self.direction = check_direction(direction)

    def forward(
        self,
        img: Tensor,
        img_mask: Tensor,
        cap: Tensor,
        cap_mask: Tensor,
        pooling: nn.Module | None = None,
    ) -> Tensor:
        """``img [B1, K, d]``, ``img_mask [B1, K]``, ``cap [B2, L, d]``, ``cap_mask [B2, L]``
        -> ``[B1, B2]``. ``pooling`` is ignored (mean aggregation)."""
        s = region_word_scores(img, cap)  # [B1, K, B2, L]
        out = None
        if self.direction in ("t2i", "both"):
            alpha = t2i_weights(s, img_mask, cap_mask, "clipped_l2norm", self.lambda_softmax)
            alpha = focal_weights(alpha, img_mask[:, :, None, None], 1, self.focal)
            words = t2i_cosine(s, alpha, gram(img), sq_norm(cap))  # [B1, B2, L]
            del alpha
            out = _masked_mean(words, cap_mask[None])
        if self.direction in ("i2t", "both"):
            alpha = i2t_weights(s, img_mask, cap_mask, "clipped_l2norm", self.lambda_softmax)
            alpha = focal_weights(alpha, cap_mask[None, None], 3, self.focal)
            regions = i2t_cosine(s, alpha, gram(cap), sq_norm(img))  # [B1, B2, K]
            del alpha
            part = _masked_mean(regions, img_mask[:, None, :])
            out = part if out is None else out + part
        return out

    # --- block-wise inference ------------------------------------------------------------

    def _fast(self, x: Tensor) -> bool:
        return fast_softmax_ok("clipped_l2norm", self.lambda_softmax, x.dtype)

    def prepare_images(self, img: Tensor, img_mask: Tensor) -> dict[str, Tensor]:
        if not self._fast(img):
            return {}
        return {"gram1": gram_with_ones(img, img_mask), "sq": sq_norm(img)}

    def prepare_captions(self, cap: Tensor, cap_mask: Tensor) -> dict[str, Tensor]:
        return caption_cache(cap, cap_mask, self.direction) if self._fast(cap) else {}

    def score_block(self, img, img_mask, cap, cap_mask, pooling, img_cache, cap_cache, ws):
        """Inference path: SCAN's in-place kernel with the focal selection applied to the
        unnormalised weights (:func:`~itm.models.align.base.attend_cosine`), mean pooling."""
        if not self._fast(img):
            return self(img, img_mask, cap, cap_mask, pooling)
        return scan_block(
            ws,
            img,
            img_mask,
            cap,
            cap_mask,
            None,
            img_cache,
            cap_cache,
            self.direction,
            "clipped_l2norm",
            self.lambda_softmax,
            focal=self.focal,
        )

    def extra_repr(self) -> str:
        return (
            f"focal={self.focal}, lambda_softmax={self.lambda_softmax}, direction={self.direction}"
        )
