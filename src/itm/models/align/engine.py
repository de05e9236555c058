"""The block-wise scoring engine: the full ``[n_images, n_captions]`` matrix under a memory budget.

:func:`score_matrix` drives any :class:`~itm.models.align.base.AlignHead` through the protocol
of ``base.py``: it sorts the captions by length, cuts images and captions into blocks sized from
the head's :meth:`~itm.models.align.base.AlignHead.bytes_per_pair` and the budget, zeroes padded
slots, and hands each block to the head's ``score_block`` with a :class:`Workspace` whose
buffers live across blocks. The in-place soft-attention kernel that SCAN and BFAN share
(:func:`soft_attention_scores`, with the fused C kernel of ``fused.py`` for float32 on the CPU)
lives here too.

Kernel conventions. ``score_block`` receives inputs whose padded slots are ZERO, so they add 0 to
every raw score: padded queries give zero scores (which drop out of every norm and are masked by
the pooling), and padded context items are zeroed in the attention weights by a row fill that
touches only those rows; no ``[B1, K, B2, L]`` mask is ever built.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from itm.models.align.attention import COS_EPS, gram
from itm.models.functional import L2_EPS, lengths_to_mask

if TYPE_CHECKING:
    from itm.models.align.base import AlignHead

__all__ = [
    "BF16_EXACT_TOP",
    "CHUNK_BYTES",
    "PRECISIONS",
    "FAST_MAX_LAMBDA",
    "MAX_CAPTION_BLOCK",
    "SelectHook",
    "Workspace",
    "attend_cosine",
    "block_scores",
    "block_sizes",
    "context_gram",
    "fast_softmax_ok",
    "invalid_rows",
    "rescore_top",
    "score_matrix",
    "soft_attention_scores",
]

#: captions per block (CPU favours 64-128; larger blocks only grow the workspace)
MAX_CAPTION_BLOCK = 128
#: scoring precisions: ``fp32`` (exact, the default) or ``bf16`` (the large products in
#: bfloat16 with float32 accumulation; attention normalisation, softmax, pooling in float32)
PRECISIONS = ("fp32", "bf16")
#: bf16 scoring: the best pairs of every image's row and every caption's column scored again in
#: float32 (:func:`rescore_top`)
BF16_EXACT_TOP = 10
#: Post-GEMM work runs over chunks of context sets whose score tile is about this size, so the
#: ~10 elementwise passes stay in cache (the block's single matrix product is not chunked).
CHUNK_BYTES = 16 * 2**20
#: Largest softmax temperature of the fast path: its weights are exp(lambda * normed) with
#: |normed| <= 1 (no max shift), so the normaliser Z lies in [e^-lambda, K e^lambda] and
#: Z^2 stays finite in float32.
FAST_MAX_LAMBDA = 30.0
#: A context set whose largest squared norm exceeds this has its Gram matrix scaled by a power
#: of 4 (see :func:`context_gram`), so that ``w^T G w ~ Z^2 |c|^2`` cannot overflow float32 for
#: un-normalised encoders (``norm: false``).
GRAM_SCALE_ABOVE = 2.0**16


class Workspace:
    """Named scratch buffers reused across blocks (fresh block-sized allocations page-fault).

    ``get(name, shape, like)`` returns a view of a flat buffer with at least ``prod(shape)``
    elements of ``like``'s dtype and device, growing it when needed. Blocks are scored from the
    longest captions down, so the first block sizes every buffer. ``memo(name, key, build)``
    keeps one derived tensor per name for as long as its ``key`` stays the same (e.g. a
    transposed image block, keyed by the image block's :attr:`~itm.models.align.base.Block.key`).
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}
        self._memo: dict[str, tuple[Hashable, Tensor]] = {}

    def get(self, name: str, shape: Iterable[int], like: Tensor) -> Tensor:
        shape = tuple(int(n) for n in shape)
        numel = 1
        for n in shape:
            numel *= n
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

    def memo(self, name: str, key: Hashable, build: Callable[[], Tensor]) -> Tensor:
        """``build()``, reused while ``key`` stays the same (only the latest key's tensor is
        kept per name)."""
        hit = self._memo.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        self._memo.pop(name, None)  # free the old tensor before building the new one
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


# --- the shared soft-attention kernel (SCAN, BFAN) -------------------------------------------


class SelectHook(Protocol):
    """A head's step between the attention weights and the cosine (BFAN's focal selection).

    Called in place on the UNNORMALISED weights ``w [Bc, Kc, N]`` of a chunk (0 at padded
    context items) with a scratch buffer of the same shape and the context mask ``[Bc, Kc]``;
    it may zero weights (the normaliser is recomputed afterwards from the kept ones)."""

    def __call__(self, w: Tensor, scratch: Tensor, ctx_mask: Tensor) -> None: ...


def invalid_rows(mask: Tensor) -> Tensor | None:
    """Flat indices of the invalid slots of ``mask [B, N]`` (None when every slot is valid)."""
    if bool(mask.all()):
        return None
    return torch.nonzero(~mask.reshape(-1)).flatten()


def context_gram(x: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """What the kernel needs of context sets ``x [B, N, d]`` (padded slots zero, ``mask [B, N]``):
    ``gram1 [B, N + 1, N]`` = the Gram matrix with the validity row appended, so that ONE batched
    product ``[G ; m^T] w`` yields ``G w`` and, in its last row, the softmax normaliser; and
    ``gram_scale [B]``, 1 except for a set whose ``max |c|^2`` exceeds ``GRAM_SCALE_ABOVE``
    (un-normalised encoders): that set's ``G`` is stored divided by ``4^k`` and its cosines are
    divided by ``2^k`` (``gram_scale = 2^k``; both exact in floating point), so ``w^T G w``
    cannot overflow."""
    g = gram(x)
    diag_max = torch.diagonal(g, dim1=1, dim2=2).amax(dim=1)  # [B]
    k = torch.where(
        diag_max > GRAM_SCALE_ABOVE,
        torch.ceil(0.5 * torch.log2(diag_max.clamp_min(1.0))),  # 4^k >= max |c|^2
        torch.zeros_like(diag_max),
    )
    if bool((k > 0).any()):
        g = g * torch.exp2(-2 * k)[:, None, None]
    gram1 = torch.cat([g, mask.to(g.dtype).unsqueeze(1)], dim=1)
    return {"gram1": gram1, "gram_scale": torch.exp2(k)}


def fast_softmax_ok(kind: str, lambda_softmax: float, dtype: torch.dtype) -> bool:
    """Whether :func:`soft_attention_scores` applies (bounded logits; float32 / float64)."""
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
    select: SelectHook | None = None,
    ctx_mask: Tensor | None = None,
) -> Tensor:
    """Soft attention + per-query cosine for a chunk, in place on ``ws`` (inference only).

    Layout: ``s [Bc, Kc, N]`` holds the raw scores of context set ``c`` (``Kc`` items, axis 1)
    against ``N = Lq * Bq`` query items laid out ITEM-MAJOR (query item ``w`` of query set
    ``j`` at ``w * Bq + j``), so that the feature norm across each query set reduces over a
    middle axis with a long contiguous inner axis. For t2i the context sets are images and the
    queries words; for i2t the transpose. Padded queries and padded context items must have
    ZERO raw scores; ``s`` is only read.

    Steps (docs/foundations.md): feature norm across each query set, times ``lambda``, exp (no max
    shift: the normed scores lie in [-1, 1]); padded context rows set to 0; the head's
    ``select`` hook; then ``G w`` and the normaliser ``Z = sum w`` from ONE batched product with
    ``[G ; 1]``; ``dot = sum w s``; the cosine of each query item with its attended vector,
    ``(dot / Z) / sqrt(max(|q|^2 |w^T G w| / Z^2, eps^2))``.

    Args:
        n_query_sets: ``Bq``.
        ctx_gram1: ``[Bc, Kc + 1, Kc]`` (:func:`context_gram`).
        ctx_pad: flat indices (into ``Bc * Kc``) of padded context items, or None.
        query_sq: squared norms of the query items, ``[Lq, Bq]`` (item-major).
        select: see :class:`SelectHook`; needs ``ctx_mask``.

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
    if select is not None:
        assert ctx_mask is not None, "a select hook needs the context mask"
        select(a, tmp.view(bc, kc, n), ctx_mask)
    g = ws.get("attn_g", (bc, kc + 1, n), s)
    torch.bmm(ctx_gram1, a, out=g)
    z = g[:, kc]  # [Bc, N] sum of the weights
    dot_u = torch.mul(a, s, out=tmp.view(bc, kc, n)).sum(dim=1)  # [Bc, N]  sum w s
    att_u = a.mul_(g[:, :kc]).sum(dim=1)  # [Bc, N]  w^T G w
    dot_u.div_(z)
    att_u.div_(z).div_(z).mul_(query_sq.reshape(1, n)).clamp_min_(COS_EPS * COS_EPS).sqrt_()
    return dot_u.div_(att_u).view(bc, lq, bq)


def block_scores(ws: Workspace, name: str, ctx: Tensor, query_t: Tensor) -> Tensor:
    """Raw scores of every context item against every query item, ONE matrix product:
    ``ctx [Bc, Kc, d]``, ``query_t [Lq, Bq, d]`` (item-major) -> ``[Bc, Kc, Lq * Bq]`` (a
    workspace view). bfloat16 inputs (bf16 scoring) give float32 scores on a GPU (tensor
    cores, float32 output) and bfloat16 scores on the CPU (oneDNN accumulates in float32 and
    rounds the output; the kernels widen it)."""
    bc, kc, d = ctx.shape
    lq, bq, _ = query_t.shape
    a, b = ctx.reshape(bc * kc, d), query_t.reshape(lq * bq, d).T
    if ctx.dtype == torch.bfloat16 and ctx.device.type != "cpu":
        return torch.mm(a, b, out_dtype=torch.float32).view(bc, kc, lq * bq)
    out = ws.get(name, (bc * kc, lq * bq), ctx)
    torch.mm(a, b, out=out)
    return out.view(bc, kc, lq * bq)


def widened(ws: Workspace, s: Tensor) -> Tensor:
    """``s`` as float32 (bf16 scores of the CPU widened into a workspace buffer; others as
    they are)."""
    if s.dtype != torch.bfloat16:
        return s
    out = ws.get("s_wide", s.shape, s.new_empty((), dtype=torch.float32))
    return out.copy_(s)


def context_chunks(bc: int, kc: int, n: int, elem_size: int) -> tuple[range, int]:
    """Start offsets of the context-set chunks of a ``[Bc, Kc, N]`` score tensor."""
    per_set = max(1, kc * n * elem_size)
    step = max(1, min(bc, CHUNK_BYTES // per_set))
    return range(0, bc, step), step


def soft_attention_scores(
    ws: Workspace,
    s: Tensor,
    ctx_mask: Tensor,
    ctx: Mapping[str, Tensor],
    query_sq: Tensor,
    n_query_sets: int,
    kind: str,
    lambda_softmax: float,
    select: SelectHook | None = None,
) -> Tensor:
    """Per-query cosines of a whole block, chunked over context sets: ``[Bc, Lq, Bq]``.

    ``s [Bc, Kc, Lq*Bq]`` raw scores (query items item-major, see :func:`attend_cosine`; float32,
    or bfloat16 from bf16 scoring), ``ctx_mask [Bc, Kc]``, ``ctx`` = :func:`context_gram` of the
    context sets,
    ``query_sq [Lq, Bq]`` squared query norms. Without a ``select`` hook, float32 CPU blocks
    take the fused C kernel (``fused.py``) when it is available.
    """
    gram1 = ctx["gram1"]
    out: Tensor | None = None
    if select is None:
        from itm.models.align.fused import attend_cosine_fused

        out = attend_cosine_fused(s, n_query_sets, gram1, ctx_mask, query_sq, kind, lambda_softmax)
    if out is None:
        s = widened(ws, s)
        bc, kc, n = s.shape
        out = s.new_empty(bc, n // n_query_sets, n_query_sets)
        starts, step = context_chunks(bc, kc, n, s.element_size())
        for c0 in starts:
            c1 = min(bc, c0 + step)
            mask = ctx_mask[c0:c1]
            out[c0:c1] = attend_cosine(
                ws,
                s[c0:c1],
                n_query_sets,
                gram1[c0:c1],
                invalid_rows(mask),
                query_sq,
                kind,
                lambda_softmax,
                select=select,
                ctx_mask=mask,
            )
    scale = ctx.get("gram_scale")
    if scale is not None and bool((scale != 1).any()):
        out = out / scale.view(-1, 1, 1).to(out.dtype)
    return out


# --- the driver ---------------------------------------------------------------------------------


def block_sizes(
    head: AlignHead,
    n_regions: int,
    n_words: int,
    elem_size: int,
    max_block_mb: float,
    n_img: int,
    max_caption_block: int = MAX_CAPTION_BLOCK,
) -> tuple[int, int]:
    """(images, captions) per block so that the head's workspace fits ``max_block_mb``.

    Up to ``max_caption_block`` captions per block; the images of a block are balanced
    (``n_img`` split into equal parts, none larger than the budget allows)."""
    per_pair = max(1, head.bytes_per_pair(n_regions, n_words, elem_size))
    pairs = max(1, int(max_block_mb * 2**20) // per_pair)
    n_cap_block = max(1, min(max_caption_block, pairs))
    n_img_block = max(1, min(n_img, pairs // n_cap_block))
    n_parts = -(-n_img // n_img_block)
    return -(-n_img // n_parts), n_cap_block


@torch.no_grad()
def score_matrix(
    head: AlignHead,
    pooling: nn.Module | None,
    img: Tensor,
    img_lens: Tensor,
    cap: Tensor,
    cap_lens: Tensor,
    max_block_mb: float = 256,
    progress: Callable[[int], None] | None = None,
    max_caption_block: int = MAX_CAPTION_BLOCK,
    workspace: Workspace | None = None,
    precision: str = "fp32",
    exact_top: int = BF16_EXACT_TOP,
) -> Tensor:
    """The full ``[n_images, n_captions]`` score matrix of ``head``, block by block.

    Captions are sorted by length and each block is padded only to its own longest caption;
    per block the head's inference path (``score_block``) computes all region-word scores with
    one matrix product into the reused workspace and works in place from there. Padded regions
    / words are zeroed first (any finite padding gives the same result). Block sizes come from
    the head's workspace estimate and ``max_block_mb``, so peak memory does not grow with the
    number of images or captions (beyond the inputs, the output and small per-image quantities
    such as Gram matrices). Image blocks are visited in serpentine order (reversed on every
    other caption block), so the first image block of a caption block is the last one of the
    previous caption block and its ``Workspace.memo`` tensors are reused across that boundary.

    Args:
        progress: optional callback receiving the number of pairs scored by each block.
        workspace: the buffers to use (a fresh :class:`Workspace` by default).
        precision: ``fp32`` (exact) or ``bf16``: the head's large products in bfloat16 from
            :attr:`~itm.models.align.base.Block.lowp` (float32 accumulation), everything else
            in float32; a head without ``supports_bf16`` is refused. The images are cast once
            (a bfloat16 copy of the inputs, half their size), each caption block once.
        exact_top: bf16 only: the ``exact_top`` best captions of every image and best images
            of every caption (by the bf16 scores) are scored again in float32
            (:func:`rescore_top`), so the order that R@1/5/10 read is the float32 order unless
            a pair's bf16 error exceeds the gap to the ``exact_top``-th score; 0 turns it off.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    lowp = precision == "bf16"
    if lowp:
        check_bf16(head)
    if lowp and img.dtype != torch.float32:
        img, cap = img.float(), cap.float()
    args = (head, pooling, img, img_lens, cap, cap_lens, max_block_mb)
    ws = Workspace() if workspace is None else workspace
    out = _score_blocks(*args, progress, max_caption_block, ws, lowp)
    if lowp and exact_top > 0:
        ws.clear()
        rescore_top(*args, out, exact_top)
    return out


def check_bf16(head: AlignHead) -> None:
    """Refuse bf16 scoring for a head without ``supports_bf16``, with the head's reason."""
    if not head.supports_bf16:
        raise ValueError(
            f"{type(head).__name__} does not support bf16 scoring (eval.precision=bf16): "
            f"{head.bf16_refusal}; use precision fp32"
        )


def rescore_top(
    head: AlignHead,
    pooling: nn.Module | None,
    img: Tensor,
    img_lens: Tensor,
    cap: Tensor,
    cap_lens: Tensor,
    max_block_mb: float,
    sims: Tensor,
    top: int,
) -> Tensor:
    """Score again, in float32 and in place in ``sims``, every pair among the ``top`` highest of
    its image's row or of its caption's column: ``(n_images + n_captions) * top`` pairs at most
    (about ``top`` per image and per caption: ~1 % of Flickr30K's 5M pairs at ``top = 10``),
    one image at a time against its candidate captions."""
    n_img, n_cap = sims.shape
    m_row, m_col = min(top, n_cap), min(top, n_img)
    rows = sims.topk(m_row, dim=1).indices  # [n_img, m_row] best captions of each image
    cols = sims.topk(m_col, dim=0).indices  # [m_col, n_cap] best images of each caption
    img_idx = torch.cat([torch.arange(n_img).repeat_interleave(m_row), cols.reshape(-1).cpu()])
    cap_idx = torch.cat([rows.reshape(-1).cpu(), torch.arange(n_cap).repeat(m_col)])
    pairs = torch.unique(img_idx * n_cap + cap_idx)  # sorted: grouped by image
    img_idx, cap_idx = pairs // n_cap, pairs % n_cap
    counts = torch.bincount(img_idx, minlength=n_img).tolist()
    # many small products: one thread, which never waits for a descheduled sibling (on a
    # loaded 2-core machine each small multi-threaded op cost ~10 ms, single-threaded ~0.1 ms)
    threads = torch.get_num_threads()
    if sims.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        _rescore_rows(
            head, pooling, img, img_lens, cap, cap_lens, max_block_mb, sims, counts, cap_idx
        )
    finally:
        torch.set_num_threads(threads)
    return sims


def _rescore_rows(
    head: AlignHead,
    pooling: nn.Module | None,
    img: Tensor,
    img_lens: Tensor,
    cap: Tensor,
    cap_lens: Tensor,
    max_block_mb: float,
    sims: Tensor,
    counts: list[int],
    cap_idx: Tensor,
) -> None:
    """Row ``i`` of ``sims`` at its ``counts[i]`` captions of ``cap_idx`` (grouped by image),
    scored in float32 by the head's direct path (one image against its few candidates: no
    block machinery)."""
    img_mask = lengths_to_mask(img_lens, img.shape[1])
    start = 0
    for i, count in enumerate(counts):
        if count == 0:
            continue
        idx = cap_idx[start : start + count].to(sims.device)
        start += count
        lens = cap_lens[idx]
        n_words = int(lens.max())
        exact = head(
            img[i : i + 1],
            img_mask[i : i + 1],
            cap[idx, :n_words],
            lengths_to_mask(lens, n_words),
            pooling,
        )
        sims[i, idx] = exact[0].to(sims.dtype)


def _score_blocks(
    head: AlignHead,
    pooling: nn.Module | None,
    img: Tensor,
    img_lens: Tensor,
    cap: Tensor,
    cap_lens: Tensor,
    max_block_mb: float,
    progress: Callable[[int], None] | None,
    max_caption_block: int,
    ws: Workspace,
    lowp: bool,
) -> Tensor:
    """The block loop of :func:`score_matrix` (``lowp``: bf16 products)."""
    from itm.models.align.base import Block

    n_img, n_cap = img.shape[0], cap.shape[0]
    out = img.new_empty(n_img, n_cap)
    if n_img == 0 or n_cap == 0:
        return out
    order = torch.argsort(cap_lens, descending=True, stable=True)
    sorted_lens = cap_lens[order]
    k_max = int(img_lens.max())
    img = img[:, :k_max]
    img_mask = lengths_to_mask(img_lens, k_max)
    img_padded = bool((img_lens < k_max).any())
    # per-image quantities (Gram matrices, norms: O(N K^2)), computed in chunks
    img_cache = _cat_caches(
        head.prepare_images(*_zero_pad(img[i : i + 1024], img_mask[i : i + 1024]))
        for i in range(0, n_img, 1024)
    )
    img_lp = _zero_pad(img, img_mask)[0].to(torch.bfloat16) if lowp else None
    start = n_cap_blocks = 0
    while start < n_cap:
        n_words = int(sorted_lens[start])  # longest caption of this block (sorted)
        b1, b2 = block_sizes(
            head, k_max, n_words, img.element_size(), max_block_mb, n_img, max_caption_block
        )
        idx = order[start : start + b2]
        cap_mask = lengths_to_mask(cap_lens[idx], n_words)
        cap_emb, _ = _zero_pad(torch.index_select(cap[:, :n_words], 0, idx), cap_mask, True)
        captions = Block(
            cap_emb,
            cap_mask,
            head.prepare_captions(cap_emb, cap_mask),
            start,
            cap_emb.to(torch.bfloat16) if lowp else None,
        )
        starts = range(0, n_img, b1)
        n_cap_blocks += 1
        for i0 in starts if n_cap_blocks % 2 else reversed(starts):
            i1 = min(n_img, i0 + b1)
            img_emb, mask = img[i0:i1], img_mask[i0:i1]
            if img_padded:
                img_emb, _ = _zero_pad(img_emb, mask)
            images = Block(
                img_emb,
                mask,
                {k: v[i0:i1] for k, v in img_cache.items()},
                (i0, i1),
                None if img_lp is None else img_lp[i0:i1],
            )
            scores = head.score_block(images, captions, pooling, ws)
            out[i0:i1, idx] = scores.to(out.dtype)
            if progress is not None:
                progress(scores.numel())
        start += b2
    return out


def _zero_pad(x: Tensor, mask: Tensor, copied: bool = False) -> tuple[Tensor, Tensor]:
    """``x [B, N, d]`` with the slots outside ``mask [B, N]`` set to 0 (a copy unless
    ``copied``, i.e. ``x`` is already a private copy)."""
    if bool(mask.all()):
        return x, mask
    if not copied:
        x = x.clone()
    rows = torch.nonzero(~mask.reshape(-1)).flatten()
    x.view(-1, x.shape[-1]).index_fill_(0, rows, 0.0)
    return x, mask


def _cat_caches(parts: Iterable[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    parts = list(parts)
    if not parts or not parts[0]:
        return {}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
