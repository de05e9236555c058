"""BFAN: bidirectional focal attention (Liu et al., ACM MM 2019; docs/bfan.md).

SCAN's attention, then a focal selection keeps only the context items that a query attends to
more than a reference level, renormalises their weights, and scores each fragment by the cosine
with the re-attended vector. The t2i part is the MEAN over the caption's words, the i2t part the
mean over the image's regions; ``both`` adds them. The selection is the only idea of this file:
in training it acts on SCAN's weights (:func:`focal_weights`); in evaluation it is the engine's
``select`` hook inside SCAN's in-place kernel (:class:`FocalSelect`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itm.models.align.attention import (
    gram,
    i2t_cosine,
    i2t_weights,
    pair_scores,
    region_word_scores,
    sq_norm,
    t2i_cosine,
    t2i_weights,
)
from itm.models.align.base import AlignHead, Block, check_direction
from itm.models.align.engine import Workspace, fast_softmax_ok
from itm.models.align.scan import caption_cache, image_cache, scan_block
from itm.models.pooling import AvgPool, pool_scores

__all__ = ["BFAN", "FOCALS", "FocalSelect", "focal_mask", "focal_tolerance", "focal_weights"]

FOCALS = ("equal", "prob")
#: BFAN's aggregation: the mean over fragments (one instance, no parameters)
_MEAN = AvgPool()


def focal_tolerance(dtype: torch.dtype) -> float:
    """Relative margin below which BFAN's whole focal set counts as tied.

    When every valid context item has the same attention weight (e.g. every region scores the
    same against a one-word caption), ``F = 0`` for all of them in exact arithmetic and the
    focal set is empty; float rounding then leaves some ``F`` a few ulps above 0 and would keep
    an arbitrary subset, differently in :meth:`BFAN.forward` and in the block engine. So a set
    is "empty" (the un-focused fallback) unless some item has ``F > tol * scale``; items are
    still kept by the reference's ``F > 0`` otherwise. Ties of a proper subset cannot sit on
    the threshold (it lies strictly between the smallest and the largest weight)."""
    return 16 * torch.finfo(dtype).eps


def _focal_score(
    a: Tensor, n_ctx: Tensor | None, dim: int, focal: str, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(F, scale)`` of the focal rule over the context axis ``dim`` of normalised weights
    ``a`` (0 at invalid context): ``equal`` ``F = S a_p - sum a`` (``S = n_ctx``, the number of
    valid context items), ``prob`` ``F = a_p sum sqrt(a) - sum a^1.5``; ``scale`` is the
    subtracted sum (the tie threshold's reference). ``out``: a buffer for ``F``."""
    if focal == "equal":
        assert n_ctx is not None
        total = a.sum(dim=dim, keepdim=True)  # ~1, as the reference sums
        f = torch.mul(a, n_ctx, out=out) if out is not None else a * n_ctx
        return f.sub_(total), total
    if focal == "prob":
        root = torch.sqrt(a, out=out) if out is not None else torch.sqrt(a)
        sum_root = root.sum(dim=dim, keepdim=True)
        scale = root.mul_(a).sum(dim=dim, keepdim=True)  # sum a^1.5
        f = torch.mul(a, sum_root, out=out) if out is not None else a * sum_root
        return f.sub_(scale), scale
    raise ValueError(f"focal must be one of {FOCALS}, got {focal!r}")


def focal_mask(alpha: Tensor, ctx_mask: Tensor, dim: int, focal: str) -> Tensor:
    """Focal selection ``H = [F > 0]`` over the context axis ``dim`` of the weights ``alpha``
    (any layout, softmax-normalised over ``dim``, 0 at invalid context; ``ctx_mask``
    broadcastable to it). ``H`` is a step function, so it is computed without gradient; a set
    whose weights all tie keeps nothing (:func:`focal_tolerance`). Returns bool, False at
    invalid context."""
    with torch.no_grad():
        a = alpha.detach()
        n_ctx = ctx_mask.sum(dim=dim, keepdim=True).to(a.dtype) if focal == "equal" else None
        f, scale = _focal_score(a, n_ctx, dim, focal)
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


class FocalSelect:
    """The focal selection as the engine's ``select`` hook (``engine.SelectHook``): on the
    unnormalised weights ``w [Bc, Kc, N]`` of a chunk, in place, with the same rule and the
    same empty-set fallback as :func:`focal_weights` (the kept weights stay unnormalised; the
    kernel recomputes the normaliser)."""

    def __init__(self, focal: str) -> None:
        if focal not in FOCALS:
            raise ValueError(f"focal must be one of {FOCALS}, got {focal!r}")
        self.focal = focal

    def __call__(self, w: Tensor, scratch: Tensor, ctx_mask: Tensor) -> None:
        bc, kc, _ = w.shape
        w.div_(w.sum(dim=1, keepdim=True))  # alpha
        n_ctx = ctx_mask.sum(dim=1).to(w.dtype).view(bc, 1, 1) if self.focal == "equal" else None
        f, scale = _focal_score(w, n_ctx, 1, self.focal, out=scratch)
        keep = f > 0
        # all weights tied (F = 0 up to rounding): the focal set is empty, see focal_tolerance
        none_kept = f.amax(dim=1, keepdim=True) <= scale * focal_tolerance(w.dtype)  # [Bc, 1, N]
        if bool(none_kept.any()):
            keep |= none_kept & ctx_mask.view(bc, kc, 1)
        w.mul_(keep)


class BFAN(AlignHead):
    """Bidirectional focal attention: SCAN's attention, then keep only the relevant context.

    Per direction: attention weights as SCAN (``clipped_l2norm`` across the queries, softmax
    with ``lambda_softmax`` over the valid context), focal selection ``F > 0`` (``equal`` or
    ``prob``, see :func:`focal_mask`), renormalisation of the kept weights, then the cosine
    of each query fragment with its attended vector (from the shared score tensor and the Gram
    matrices, never materialising ``[B1, B2, L, d]``). The t2i part is the MEAN over the
    caption's valid words, the i2t part the MEAN over the image's valid regions; ``both`` adds
    them (range up to 2).

    Pooling: BFAN defines mean aggregation (``pooling_role = "fixed"``): its config selects
    ``pooling=avg`` and any other pooling is refused.

    Empty focal set: a query whose focal set is empty (see :func:`focal_weights`) uses its
    un-focused weights instead of the reference's NaN.

    Memory: about five live ``[K, L]`` buffers per pair at the peak (measured, either focal),
    within the base class's default :meth:`bytes_per_pair` estimate of six.

    Args:
        focal: ``equal`` (default) | ``prob``.
        lambda_softmax: inverse temperature of the attention softmax (20 in both directions).
        direction: ``t2i`` | ``i2t`` | ``both`` (default).
    """

    pooling_role = "fixed"
    fixed_pooling = (AvgPool,)
    fixed_pooling_name = "the mean (pooling=avg)"
    supports_bf16 = True  # SCAN's kernel path (its product in bfloat16)

    def __init__(
        self, focal: str = "equal", lambda_softmax: float = 20.0, direction: str = "both"
    ) -> None:
        super().__init__()
        self.select = FocalSelect(focal)
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
        -> ``[B1, B2]`` (``pooling`` is unused: mean aggregation)."""
        s = region_word_scores(img, cap)  # [B1, K, B2, L]
        out = None
        if self.direction in ("t2i", "both"):
            alpha = self.weights(s, img_mask, cap_mask, "t2i")
            words = t2i_cosine(s, alpha, gram(img), sq_norm(cap))  # [B1, B2, L]
            del alpha
            out = pool_scores(_MEAN, words, cap_mask[None])
        if self.direction in ("i2t", "both"):
            alpha = self.weights(s, img_mask, cap_mask, "i2t")
            regions = i2t_cosine(s, alpha, gram(cap), sq_norm(img))  # [B1, B2, K]
            del alpha
            part = pool_scores(_MEAN, regions, img_mask[:, None, :])
            out = part if out is None else out + part
        assert out is not None
        return out

    def weights(self, s: Tensor, img_mask: Tensor, cap_mask: Tensor, direction: str) -> Tensor:
        """Focal weights ``alpha_hat [B1, K, B2, L]`` of one direction from the raw scores."""
        if direction == "t2i":
            alpha = t2i_weights(s, img_mask, cap_mask, "clipped_l2norm", self.lambda_softmax)
            return focal_weights(alpha, img_mask[:, :, None, None], 1, self.focal)
        alpha = i2t_weights(s, img_mask, cap_mask, "clipped_l2norm", self.lambda_softmax)
        return focal_weights(alpha, cap_mask[None, None], 3, self.focal)

    def alignment(self, img: Tensor, cap: Tensor) -> Tensor:
        """The renormalised focal weights of the head's first direction, ``[L, K]``."""
        s, ones_i, ones_c = pair_scores(img, cap)
        direction = "i2t" if self.direction == "i2t" else "t2i"
        return self.weights(s, ones_i, ones_c, direction)[0, :, 0, :].T

    @property
    def alignment_normalised(self) -> str:
        return "words" if self.direction == "i2t" else "regions"

    # --- block-wise inference ------------------------------------------------------------

    def _fast(self, x: Tensor) -> bool:
        return fast_softmax_ok("clipped_l2norm", self.lambda_softmax, x.dtype)

    def prepare_images(self, img: Tensor, img_mask: Tensor) -> dict[str, Tensor]:
        return image_cache(img, img_mask, self.direction) if self._fast(img) else {}

    def prepare_captions(self, cap: Tensor, cap_mask: Tensor) -> dict[str, Tensor]:
        return caption_cache(cap, cap_mask, self.direction) if self._fast(cap) else {}

    def score_block(
        self, images: Block, captions: Block, pooling: nn.Module | None, ws: Workspace
    ) -> Tensor:
        """Inference path: SCAN's in-place kernel with the focal selection as its ``select``
        hook, mean pooling."""
        if not self._fast(images.emb):
            return self(images.emb, images.mask, captions.emb, captions.mask)
        return scan_block(
            ws,
            images,
            captions,
            _MEAN,
            self.direction,
            "clipped_l2norm",
            self.lambda_softmax,
            select=self.select,
        )

    def extra_repr(self) -> str:
        return (
            f"focal={self.focal}, lambda_softmax={self.lambda_softmax}, direction={self.direction}"
        )
