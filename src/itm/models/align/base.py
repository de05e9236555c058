"""Shared machinery of the alignment heads.

Layout convention. All region-word scores of a block of ``B1`` images and ``B2`` captions come
from ONE matrix product and live in a tensor ``s [B1, K, B2, L]`` with
``s[i, r, j, w] = v_{i,r} . e_{j,w}`` (image ``i``, region ``r``, caption ``j``, word ``w``). In that
layout a reduction over regions (axis 1) runs over a non-innermost axis with a long contiguous
inner axis, and the image Gram product ``G_i @ alpha_i`` is one batched matrix product.

Masks: ``img_mask [B1, K]`` and ``cap_mask [B2, L]`` are bool, True = valid. Invalid slots may hold
any finite values; every function here keeps them out of every valid result and gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_NORMS = ("clipped_l2norm", "l2norm", "softmax", "clipped", "no_norm")
DIRECTIONS = ("t2i", "i2t", "both")
L2_EPS = 1e-8  # l2n(x) = x / (||x|| + 1e-8)
COS_EPS = 1e-8  # cos(x, y) = x.y / max(||x|| ||y||, 1e-8)


class AlignHead(nn.Module):
    """Base class of the alignment heads (one file per paper under ``itm.models.align``).

    ``forward(img [B1, K, d], img_mask [B1, K], cap [B2, L, d], cap_mask [B2, L], pooling)``
    returns the similarity of every (image, caption) pair, ``[B1, B2]``. ``pooling`` is the
    :class:`~itm.models.pooling.SetPooling` that reduces fragment scores.
    """

    #: True when the head keeps its own copies of the pooling module (the ``global`` head).
    owns_pooling: bool = False

    def forward(
        self, img: Tensor, img_mask: Tensor, cap: Tensor, cap_mask: Tensor, pooling: nn.Module
    ) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def bind_pooling(self, pooling: nn.Module) -> None:
        """Called once by :class:`~itm.models.similarity.Similarity` with its pooling module."""

    # --- block-wise inference (``Similarity.score_matrix``) ---------------------------------

    def prepare_images(self, img: Tensor, img_mask: Tensor) -> dict[str, Tensor]:
        """Per-image quantities reused by every block (inference only), each ``[B1, ...]``.

        Called on images whose padded regions are zeroed; the engine slices the result by
        image rows. Default: nothing."""
        return {}

    def prepare_captions(self, cap: Tensor, cap_mask: Tensor) -> dict[str, Tensor]:
        """Per-caption quantities of one caption block (padded words zeroed). Default: none."""
        return {}

    def score_block(
        self,
        img: Tensor,
        img_mask: Tensor,
        cap: Tensor,
        cap_mask: Tensor,
        pooling: nn.Module | None,
        img_cache: dict[str, Tensor],
        cap_cache: dict[str, Tensor],
        ws: Workspace,
    ) -> Tensor:
        """Scores ``[B1, B2]`` of one block under ``torch.no_grad()`` (the inference path).

        Padded regions / words of ``img`` / ``cap`` are ZERO here (the engine zeroes them);
        ``ws`` holds scratch buffers reused across blocks. The default calls :meth:`forward`;
        heads override it with in-place kernels. Must equal ``forward`` on the same block.
        """
        return self(img, img_mask, cap, cap_mask, pooling)

    def bytes_per_pair(self, n_regions: int, n_words: int, elem_size: int) -> int:
        """Upper estimate of the scoring workspace for one (image, caption) pair, in bytes.

        Used by block-wise scoring to size blocks under a memory budget. The default assumes six
        live ``[K, L]`` buffers (scores, normalised scores, weights, Gram product, temporaries).
        """
        return 6 * n_regions * n_words * elem_size


def check_direction(direction: str, allowed: tuple[str, ...] = DIRECTIONS) -> str:
    if direction not in allowed:
        raise ValueError(f"direction must be one of {allowed}, got {direction!r}")
    return direction


def region_word_scores(img: Tensor, cap: Tensor) -> Tensor:
    """``s [B1, K, B2, L]`` from one matrix product of ``[B1*K, d]`` by ``[d, B2*L]``."""
    b1, k, d = img.shape
    b2, n, _ = cap.shape
    return (img.reshape(b1 * k, d) @ cap.reshape(b2 * n, d).T).view(b1, k, b2, n)


def sq_norm(x: Tensor) -> Tensor:
    """Squared l2 norm over the last axis: ``[..., d] -> [...]``."""
    return (x * x).sum(dim=-1)


def gram(x: Tensor) -> Tensor:
    """Per-set Gram matrix ``x x^T``: ``[B, N, d] -> [B, N, N]``."""
    return x @ x.transpose(1, 2)


def feature_norm(s: Tensor, kind: str, dim: int, query_mask: Tensor) -> Tensor:
    """Normalise attention scores across the QUERY axis ``dim`` (methods.md section 2, step 2).

    Args:
        s: raw scores (any layout).
        kind: one of :data:`FEATURE_NORMS`.
        dim: the query axis of ``s``.
        query_mask: bool, broadcastable to ``s``; True for valid queries. Invalid queries take no
            part in the normalising sums (their own outputs are finite and never used).
    """
    if kind == "no_norm":
        return s
    if kind == "softmax":
        return masked_softmax(s, query_mask, dim)
    if kind in ("clipped_l2norm", "clipped"):
        s = F.leaky_relu(s, 0.1)
        if kind == "clipped":
            return s
    elif kind != "l2norm":
        raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {kind!r}")
    b = torch.where(query_mask, s, s.new_zeros(()))
    ss = (b * b).sum(dim=dim, keepdim=True)
    # ss == 0 only when every valid b is 0 (then b / norm = 0 either way); replacing it by 1
    # keeps sqrt's gradient finite, e.g. for an all-zero padded context vector.
    norm = torch.sqrt(torch.where(ss > 0, ss, torch.ones_like(ss))) + L2_EPS
    return b / norm


def masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` restricted to ``mask`` (True = valid); invalid entries get weight 0."""
    return torch.where(mask, logits, logits.new_full((), float("-inf"))).softmax(dim=dim)


def cosine_from_parts(dot: Tensor, q_sq: Tensor, att_sq: Tensor) -> Tensor:
    """``cos = dot / max(||q|| ||att||, eps)`` from the dot product and the squared norms."""
    return dot / torch.sqrt((q_sq * att_sq).clamp_min(COS_EPS * COS_EPS))


# --- attention in the two directions, on the shared [B1, K, B2, L] layout -------------------


def t2i_weights(
    s: Tensor, img_mask: Tensor, cap_mask: Tensor, kind: str, lambda_softmax: float
) -> Tensor:
    """Words attend to regions: ``alpha [B1, K, B2, L]``, softmax over valid regions (axis 1)."""
    normed = feature_norm(s, kind, dim=3, query_mask=cap_mask[None, None])
    return masked_softmax(lambda_softmax * normed, img_mask[:, :, None, None], dim=1)


def i2t_weights(
    s: Tensor, img_mask: Tensor, cap_mask: Tensor, kind: str, lambda_softmax: float
) -> Tensor:
    """Regions attend to words: ``alpha [B1, K, B2, L]``, softmax over valid words (axis 3)."""
    normed = feature_norm(s, kind, dim=1, query_mask=img_mask[:, :, None, None])
    return masked_softmax(lambda_softmax * normed, cap_mask[None, None], dim=3)


def t2i_cosine(s: Tensor, alpha: Tensor, img_gram: Tensor, cap_sq: Tensor) -> Tensor:
    """Per-word ``cos(e_w, att_w)`` without forming ``att_w``: ``[B1, B2, L]``.

    ``e_w . att_w = sum_r alpha[r, w] s[r, w]`` and ``||att_w||^2 = alpha_w^T G alpha_w`` with
    ``G = V V^T`` (``img_gram [B1, K, K]``); ``cap_sq [B2, L]`` = squared word norms.
    """
    b1, k, b2, n = alpha.shape
    dot = (alpha * s).sum(dim=1)
    g_alpha = torch.bmm(img_gram, alpha.reshape(b1, k, b2 * n)).view(b1, k, b2, n)
    att_sq = (alpha * g_alpha).sum(dim=1)
    return cosine_from_parts(dot, cap_sq.unsqueeze(0), att_sq)


def i2t_cosine(s: Tensor, alpha: Tensor, cap_gram: Tensor, img_sq: Tensor) -> Tensor:
    """Per-region ``cos(v_r, att_r)`` without forming ``att_r``: ``[B1, B2, K]``.

    ``cap_gram [B2, L, L]`` = caption Gram matrices, ``img_sq [B1, K]`` = squared region norms.
    """
    b1, k, b2, n = alpha.shape
    dot = (alpha * s).sum(dim=3)  # [B1, K, B2]
    a = alpha.permute(2, 0, 1, 3).reshape(b2, b1 * k, n)
    att_sq = (a * torch.bmm(a, cap_gram)).sum(dim=2).view(b2, b1, k).permute(1, 2, 0)
    cos = cosine_from_parts(dot, img_sq.unsqueeze(2), att_sq)  # [B1, K, B2]
    return cos.transpose(1, 2)


# --- the inference engine: in-place kernels on a reused workspace ---------------------------
#
# ``Similarity.score_matrix`` calls ``AlignHead.score_block`` under ``torch.no_grad()`` with
# inputs whose padded slots are ZEROED (so they contribute 0 to every raw score) and with a
# :class:`Workspace` whose buffers live across blocks. The kernels below therefore never build
# a [B1, K, B2, L] mask: padded queries give zero scores (which drop out of every norm and end
# up masked by the pooling), and padded context items are zeroed in the attention weights by a
# row fill that touches only those rows.

#: Largest softmax temperature of the fast path: its weights are exp(lambda * normed) with
#: |normed| <= 1 (no max shift), and the unnormalised ||att||^2 ~ Z^2 must stay finite in fp32.
FAST_MAX_LAMBDA = 30.0


class Workspace:
    """Named scratch buffers reused across blocks (fresh block-sized allocations page-fault).

    ``get(name, shape, like)`` returns a view of a flat buffer with at least ``prod(shape)``
    elements of ``like``'s dtype and device, growing it when needed. Blocks are scored from the
    longest captions down, so the first block sizes every buffer.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}
        self._memo: dict[str, tuple[object, Tensor]] = {}
        #: which image rows the current block holds, ``(i0, i1)``; set by the engine so that
        #: :meth:`memo` can reuse per-image-block tensors across caption blocks
        self.image_block: tuple[int, int] | None = None

    def get(self, name: str, shape: tuple[int, ...] | list[int], like: Tensor) -> Tensor:
        numel = 1
        for n in shape:
            numel *= int(n)
        buf = self._bufs.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:numel].view(*shape)

    def memo(self, name: str, build: Callable[[], Tensor]) -> Tensor:
        """``build()`` for the current :attr:`image_block`, reused while the block stays the
        same (only the latest block's tensor is kept). Without an image block: ``build()``."""
        key = self.image_block
        if key is None:
            return build()
        hit = self._memo.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        self._memo.pop(name, None)  # free the old block's tensor before building the new one
        out = build()
        self._memo[name] = (key, out)
        return out

    def clear(self) -> None:
        self._bufs.clear()
        self._memo.clear()

    @property
    def nbytes(self) -> int:
        memo = sum(v.numel() * v.element_size() for _, v in self._memo.values())
        return memo + sum(b.numel() * b.element_size() for b in self._bufs.values())


def invalid_rows(mask: Tensor) -> Tensor | None:
    """Flat indices of the invalid slots of ``mask [B, N]`` (None when every slot is valid)."""
    if bool(mask.all()):
        return None
    return torch.nonzero(~mask.reshape(-1)).flatten()


def gram_with_ones(x: Tensor, mask: Tensor) -> Tensor:
    """``[G ; m^T]``: per-set Gram matrix with the validity row appended, ``[B, N + 1, N]``.

    ``torch.bmm(gram_with_ones(x, m), w)`` yields ``G w`` and, in its last row, the sum of the
    weights ``w`` over the valid items (the softmax normaliser) in the same product.
    """
    g = gram(x)
    return torch.cat([g, mask.to(g.dtype).unsqueeze(1)], dim=1)


def fast_softmax_ok(kind: str, lambda_softmax: float, dtype: torch.dtype) -> bool:
    """Whether :func:`attend_cosine` applies (bounded logits; float32 / float64)."""
    return (
        kind in ("clipped_l2norm", "l2norm")
        and 0.0 <= lambda_softmax <= FAST_MAX_LAMBDA
        and dtype in (torch.float32, torch.float64)
    )


def attend_cosine(
    ws: Workspace,
    s: Tensor,
    n_query_sets: int,
    ctx_gram1: Tensor,
    ctx_pad: Tensor | None,
    query_sq: Tensor,
    kind: str,
    lambda_softmax: float,
    focal: str | None = None,
    ctx_count: Tensor | None = None,
    ctx_mask: Tensor | None = None,
) -> Tensor:
    """Soft attention + per-query cosine for a block, in place on ``ws`` (inference only).

    Layout: ``s [Bc, Kc, N]`` holds the raw scores of context set ``c`` (``Kc`` items, axis 1)
    against ``N = Lq * Bq`` query items laid out ITEM-MAJOR (query item ``w`` of query set
    ``j`` at ``w * Bq + j``), so that the feature norm across each query set reduces over a
    middle axis with a long contiguous inner axis. For t2i the context sets are images and the
    queries words; for i2t the transpose (captions as context, regions as queries). Padded
    queries and padded context items must have ZERO raw scores; ``s`` is only read.

    Steps (methods.md sections 2-4): feature norm across each query set, times ``lambda``, exp
    (no max shift: the normed scores lie in [-1, 1]); padded context rows set to 0; optional
    BFAN focal selection; then ``G w`` and the normaliser ``Z = sum w`` from ONE batched
    product with ``[G ; 1]``; ``dot = sum w s``; the cosine of each query item with its
    attended vector, ``(dot / Z) / sqrt(max(|q|^2 |w^T G w| / Z^2, eps^2))``.

    Args:
        n_query_sets: ``Bq``.
        ctx_gram1: ``[Bc, Kc + 1, Kc]`` (:func:`gram_with_ones`).
        ctx_pad: flat indices (into ``Bc * Kc``) of padded context items, or None.
        query_sq: squared norms of the query items, ``[Lq, Bq]`` (item-major).

    Returns the cosines ``[Bc, Lq, Bq]`` (a fresh tensor).
    """
    bc, kc, n = s.shape
    bq = n_query_sets
    lq = n // bq
    s4 = s.view(bc, kc, lq, bq)
    a = ws.get("attn_a", (bc, kc, lq, bq), s)
    tmp = ws.get("attn_f", (bc, kc, lq, bq), s)
    if kind == "clipped_l2norm":
        torch.ops.aten.leaky_relu.out(s4, 0.1, out=a)
        src = a
    else:  # l2norm
        src = s4
    ss = torch.mul(src, src, out=tmp).sum(dim=2, keepdim=True)  # [Bc, Kc, 1, Bq]
    inv = ss.sqrt_().add_(L2_EPS).reciprocal_().mul_(lambda_softmax)
    torch.mul(src, inv, out=a)
    a = a.view(bc, kc, n).exp_()
    if ctx_pad is not None:
        a.view(bc * kc, n).index_fill_(0, ctx_pad, 0.0)
    if focal is not None:
        _focal_select(tmp.view(bc, kc, n), a, focal, ctx_count, ctx_mask)
    g = ws.get("attn_g", (bc, kc + 1, n), s)
    torch.bmm(ctx_gram1, a, out=g)
    z = g[:, kc]  # [Bc, N] sum of the weights
    dot_u = torch.mul(a, s, out=tmp.view(bc, kc, n)).sum(dim=1)  # [Bc, N]  sum w s
    att_u = a.mul_(g[:, :kc]).sum(dim=1)  # [Bc, N]  w^T G w
    dot_u.div_(z)
    att_u.div_(z).div_(z).mul_(query_sq.reshape(1, n)).clamp_min_(COS_EPS * COS_EPS).sqrt_()
    return dot_u.div_(att_u).view(bc, lq, bq)


def focal_tolerance(dtype: torch.dtype) -> float:
    """Relative margin below which BFAN's whole focal set counts as tied.

    When every valid context item has the same attention weight (e.g. every region scores the
    same against a one-word caption), ``F = 0`` for all of them in exact arithmetic and the
    focal set is empty; float rounding then leaves some ``F`` a few ulps above 0 and would keep
    an arbitrary subset, differently in :class:`~itm.models.align.bfan.BFAN`'s forward and in
    its block engine. So a set is "empty" (the un-focused fallback) unless some item has
    ``F > tol * scale``; items are still kept by the reference's ``F > 0`` otherwise. Ties of a
    proper subset cannot sit on the threshold (it lies strictly between the smallest and the
    largest weight), so nothing else changes."""
    return 16 * torch.finfo(dtype).eps


def _focal_select(
    f: Tensor, a: Tensor, focal: str, ctx_count: Tensor | None, ctx_mask: Tensor | None
) -> None:
    """BFAN focal selection in place on unnormalised weights ``a [Bc, Kc, N]`` (``f``: a
    scratch buffer of the same shape): normalise, keep ``F > 0`` (section 4), fall back to
    every valid context item where nothing is kept or all weights tie (:func:`focal_tolerance`);
    the kept weights stay unnormalised (the normaliser is recomputed by the Gram product)."""
    bc, kc, n = a.shape
    a.div_(a.sum(dim=1, keepdim=True))  # alpha
    total = a.sum(dim=1, keepdim=True)  # ~1, as the reference sums
    if focal == "equal":
        assert ctx_count is not None
        torch.mul(a, ctx_count.to(a.dtype).view(bc, 1, 1), out=f)
        f.sub_(total)
        scale = total
    else:  # prob
        torch.sqrt(a, out=f)
        sum_root = f.sum(dim=1, keepdim=True)
        ar = f.mul_(a).sum(dim=1, keepdim=True)
        torch.mul(a, sum_root, out=f).sub_(ar)
        scale = ar
    keep = f > 0
    # all weights tied (F = 0 up to rounding): the focal set is empty, see focal_tolerance
    none_kept = f.amax(dim=1, keepdim=True) <= scale * focal_tolerance(a.dtype)  # [Bc, 1, N]
    if bool(none_kept.any()):
        assert ctx_mask is not None
        keep |= none_kept & ctx_mask.view(bc, kc, 1)
    a.mul_(keep)


#: Post-GEMM work runs over chunks of context sets whose score tile is about this size, so the
#: ~10 elementwise passes stay in cache (the block's single matrix product is not chunked).
CHUNK_BYTES = 16 * 2**20


def block_scores(ws: Workspace, name: str, ctx: Tensor, query_t: Tensor) -> Tensor:
    """Raw scores of every context item against every query item, ONE matrix product:
    ``ctx [Bc, Kc, d]``, ``query_t [Lq, Bq, d]`` (item-major) -> ``[Bc, Kc, Lq * Bq]`` (a
    workspace view)."""
    bc, kc, d = ctx.shape
    lq, bq, _ = query_t.shape
    out = ws.get(name, (bc * kc, lq * bq), ctx)
    torch.mm(ctx.reshape(bc * kc, d), query_t.reshape(lq * bq, d).T, out=out)
    return out.view(bc, kc, lq * bq)


def context_chunks(bc: int, kc: int, n: int, elem_size: int) -> tuple[range, int]:
    """Start offsets of the context-set chunks of a ``[Bc, Kc, N]`` score tensor."""
    per_set = max(1, kc * n * elem_size)
    step = max(1, min(bc, CHUNK_BYTES // per_set))
    return range(0, bc, step), step


def soft_attention_scores(
    ws: Workspace,
    s: Tensor,
    ctx_mask: Tensor,
    ctx_gram1: Tensor,
    query_sq: Tensor,
    n_query_sets: int,
    kind: str,
    lambda_softmax: float,
    focal: str | None = None,
) -> Tensor:
    """Per-query cosines of a whole block, chunked over context sets: ``[Bc, Lq, Bq]``.

    ``s [Bc, Kc, Lq*Bq]`` raw scores (query items item-major, see :func:`attend_cosine`),
    ``ctx_mask [Bc, Kc]``, ``ctx_gram1 [Bc, Kc+1, Kc]`` (:func:`gram_with_ones`),
    ``query_sq [Lq, Bq]`` squared query norms.
    """
    if focal is None:
        from itm.models.align.fused import attend_cosine_fused

        fused = attend_cosine_fused(
            s, n_query_sets, ctx_gram1, ctx_mask, query_sq, kind, lambda_softmax
        )
        if fused is not None:
            return fused
    bc, kc, n = s.shape
    out = s.new_empty(bc, n // n_query_sets, n_query_sets)
    starts, step = context_chunks(bc, kc, n, s.element_size())
    count = ctx_mask.sum(dim=1) if focal is not None else None
    for c0 in starts:
        c1 = min(bc, c0 + step)
        mask = ctx_mask[c0:c1]
        out[c0:c1] = attend_cosine(
            ws,
            s[c0:c1],
            n_query_sets,
            ctx_gram1[c0:c1],
            invalid_rows(mask),
            query_sq,
            kind,
            lambda_softmax,
            focal=focal,
            ctx_count=None if count is None else count[c0:c1],
            ctx_mask=mask,
        )
    return out
