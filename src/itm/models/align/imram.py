"""IMRAM: iterative matching with recurrent attention memory (Chen et al., CVPR 2020;
docs/imram.md).

Per direction and step ``k = 1..steps`` the query memory ``q^k`` (``q^1`` = the query fragments)
attends over the ORIGINAL context (docs/foundations.md), the step score ``F_k`` pools
``cos(original query fragment, att^k)`` over the valid query fragments, and a memory
distillation unit (MDU) turns ``[q^k ; att^k]`` into ``q^{k+1}``. The score is the sum of the
step scores (and of the two directions in full mode).

Batching. A block of ``B1`` images and ``B2`` captions is scored at once:

* step 1 reuses the region-word scores ``s [B1, K, B2, L]`` of ONE matrix product (shared by
  both directions);
* the attended vectors feed the MDU, whose input layer is affine, and an attended vector is a
  convex combination of the ORIGINAL context vectors (the attention weights of the valid context
  sum to 1), so ``W_att att + b = sum_p alpha_p (W_att c_p + b)``: the MDU's attended half is
  applied once per context fragment of the block and then mixed by the weights, a batched
  ``[L, K] @ [K, 2d]`` product per pair instead of a ``[L, d] @ [d, 2d]`` one; ``att`` itself is
  never formed;
* the query half of the MDU is applied once per caption (t2i) / image (i2t) at step 1, where the
  memory is still the fragments themselves; from step 2 on the memory differs per pair, so the
  memory (``[B1, B2, L, d]`` for t2i, ``[B2, B1, K, d]`` for i2t) and the MDU pre-activations
  (twice that) are materialised per block, and the memory's scores against the context come from
  one batched product per block (per image for t2i, per caption for i2t), viewed back in the
  ``[B1, K, B2, L]`` layout;
* the fragment cosines need no ``att`` either (``attention.t2i_cosine`` / ``i2t_cosine``: the dot with
  the ORIGINAL query is ``sum alpha * s``, the norm comes from the Gram matrix).

:meth:`IMRAM.bytes_per_pair` accounts for the materialised ``[fragments, d]`` buffers, so
block-wise scoring (``Similarity.score_matrix``) keeps to its memory budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.models.align.attention import (
    FEATURE_NORMS,
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
from itm.models.align.engine import Workspace
from itm.models.functional import l2n
from itm.models.pooling import pool_scores

__all__ = ["IMRAM", "MemoryDistillationUnit"]


class MemoryDistillationUnit(nn.Module):
    """Gated memory update of IMRAM: with ``z = [query ; attended]`` (query first),
    ``g = sigmoid(gate(z))``, ``cand = tanh(candidate(z))``, ``q' = g * q + (1 - g) * cand``.

    ``gate`` and ``candidate`` are ``nn.Linear(2d, d)`` with bias (PyTorch's default init, as the
    reference). ``z`` is never formed: both Linears are applied at once, as a query half plus an
    attended half with the biases (:meth:`fused_weights`), and ``query`` may broadcast against
    ``attended``. The attended half is affine and an attended vector is a convex combination of
    context vectors, so it may equally be applied to the context vectors before the attention
    weights mix them (what :class:`IMRAM` does).
    """

    def __init__(self, embed_size: int) -> None:
        super().__init__()
        self.embed_size = int(embed_size)
        self.gate = nn.Linear(2 * self.embed_size, self.embed_size)
        self.candidate = nn.Linear(2 * self.embed_size, self.embed_size)

    def fused_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """Gate and candidate stacked (gate first): the query half ``[2d, d]``, the attended
        half ``[2d, d]`` and the biases ``[2d]``, so ``pre = w_q q + w_a att + b``."""
        d = self.embed_size
        w_q = torch.cat([self.gate.weight[:, :d], self.candidate.weight[:, :d]], dim=0)
        w_a = torch.cat([self.gate.weight[:, d:], self.candidate.weight[:, d:]], dim=0)
        return w_q, w_a, torch.cat([self.gate.bias, self.candidate.bias], dim=0)

    def update(self, query: Tensor, pre: Tensor) -> Tensor:
        """New query from the pre-activations ``pre [..., 2d]`` (gate first, then candidate)."""
        g, cand = pre.split(self.embed_size, dim=-1)
        # lerp(cand, q, g) = cand + g * (q - cand) = g * q + (1 - g) * cand; one dtype (under
        # autocast ``pre`` comes half from the Linear while ``query`` may be float32)
        dtype = torch.promote_types(pre.dtype, query.dtype)
        return torch.lerp(torch.tanh(cand).to(dtype), query.to(dtype), torch.sigmoid(g).to(dtype))

    def forward(self, query: Tensor, attended: Tensor) -> Tensor:
        """``query [..., d]``, ``attended [..., d]`` (broadcastable) -> new query ``[..., d]``."""
        w_q, w_a, bias = self.fused_weights()
        return self.update(query, F.linear(attended, w_a, bias) + F.linear(query, w_q))

    def extra_repr(self) -> str:
        return f"embed_size={self.embed_size}"


class IMRAM(AlignHead):
    """Recurrent attention memory over ``steps`` steps; text, image or full mode.

    ``t2i`` (text mode): the queries are the words, the context the regions; ``i2t`` (image
    mode): the queries are the regions, the context the words; ``both`` (full mode) adds the two.
    Each step's fragment cosines are reduced by the ``pooling`` module that ``Similarity`` passes
    in; IMRAM itself averages them, so the recipes (``conf/experiment/imram_*.yaml``) use
    ``pooling=avg``, which reproduces the paper and the authors' code. Train and eval mode give
    the same scores, laid out ``[n_images, n_captions]`` (the reference transposes them in
    training mode; we never do).

    Args:
        direction: ``t2i`` | ``i2t`` | ``both``.
        steps: number of matching steps K (>= 1).
        lambda_softmax: inverse temperature of the attention softmax (9 for F30K, 11 for COCO).
        renorm_memory: l2-normalise the memory after each update (the released recipes do not).
        embed_size: d, the size of the fragment embeddings (the MDUs are Linear(2d, d)).
        feature_norm: normalisation of the attention scores across the query axis (section 2);
            IMRAM uses ``clipped_l2norm``.

    Parameters: ``mdu_t2i`` (word-query branch) and / or ``mdu_i2t`` (region-query branch), each
    a :class:`MemoryDistillationUnit`; a single-direction head holds only its own branch.
    """

    supports_bf16 = True  # the block's and the MDU's products in bfloat16

    def __init__(
        self,
        direction: str = "both",
        steps: int = 3,
        lambda_softmax: float = 9.0,
        renorm_memory: bool = False,
        embed_size: int = 1024,
        feature_norm: str = "clipped_l2norm",
    ) -> None:
        super().__init__()
        self.direction = check_direction(direction)
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        self.steps = int(steps)
        self.lambda_softmax = float(lambda_softmax)
        self.renorm_memory = bool(renorm_memory)
        self.embed_size = int(embed_size)
        self.feature_norm = feature_norm
        if self.direction in ("t2i", "both"):
            self.mdu_t2i = MemoryDistillationUnit(self.embed_size)
        if self.direction in ("i2t", "both"):
            self.mdu_i2t = MemoryDistillationUnit(self.embed_size)

    # --- public API -------------------------------------------------------------------------

    def forward(
        self, img: Tensor, img_mask: Tensor, cap: Tensor, cap_mask: Tensor, pooling: nn.Module
    ) -> Tensor:
        """``img [B1, K, d]``, ``img_mask [B1, K]``, ``cap [B2, L, d]``, ``cap_mask [B2, L]``
        -> ``[B1, B2]``: the step scores summed over steps and directions."""
        per_direction = self.step_scores(img, img_mask, cap, cap_mask, pooling).values()
        return torch.stack([steps.sum(dim=0) for steps in per_direction]).sum(dim=0)

    def step_scores(
        self, img: Tensor, img_mask: Tensor, cap: Tensor, cap_mask: Tensor, pooling: nn.Module
    ) -> dict[str, Tensor]:
        """The pooled score of every step: ``{"t2i": [steps, B1, B2], "i2t": [steps, B1, B2]}``
        (only the head's own directions)."""
        self._check_size(img)
        s = region_word_scores(img, cap)  # [B1, K, B2, L], shared by both directions
        out = {}
        if self.direction in ("t2i", "both"):
            out["t2i"] = torch.stack(self._text_steps(s, img, img_mask, cap, cap_mask, pooling))
        if self.direction in ("i2t", "both"):
            out["i2t"] = torch.stack(self._image_steps(s, img, img_mask, cap, cap_mask, pooling))
        return out

    def alignment(self, img: Tensor, cap: Tensor) -> Tensor:
        """The attention of the FIRST step (on the encoder features) of the head's first
        direction, ``[L, K]``: t2i (and ``both``) each word over the regions, i2t each region
        over the words."""
        s, ones_i, ones_c = pair_scores(img, cap)
        fn = i2t_weights if self.direction == "i2t" else t2i_weights
        return fn(s, ones_i, ones_c, self.feature_norm, self.lambda_softmax)[0, :, 0, :].T

    @property
    def alignment_normalised(self) -> str:
        return "words" if self.direction == "i2t" else "regions"

    # --- block-wise inference ------------------------------------------------------------

    def prepare_captions(self, cap: Tensor, cap_mask: Tensor) -> dict[str, Tensor]:
        """What every image block needs of a caption block, computed once per caption block
        instead of once per (image, caption) block: the MDUs' stacked weights, the text-mode
        MDU's query half of the step-1 memory (the words themselves), the image-mode MDU's
        attended half of every word, and the words' Gram matrices."""
        out: dict[str, Tensor] = {}
        if self.direction in ("t2i", "both"):
            w_q, w_a, bias = self.mdu_t2i.fused_weights()
            out.update(w_q_t2i=w_q, w_a_t2i=w_a, bias_t2i=bias, q_half_t2i=F.linear(cap, w_q))
        if self.direction in ("i2t", "both"):
            w_q, w_a, bias = self.mdu_i2t.fused_weights()
            out.update(w_q_i2t=w_q, ctx_i2t=F.linear(cap, w_a, bias), gram=gram(cap))
        return out

    def prepare_images(self, img: Tensor, img_mask: Tensor) -> dict[str, Tensor]:
        return {"gram": gram(img)} if self.direction in ("t2i", "both") else {}

    def score_block(
        self, images: Block, captions: Block, pooling: nn.Module | None, ws: Workspace
    ) -> Tensor:
        """Inference path: the batched steps with the per-caption / per-image quantities
        (Gram matrices, the MDU's attended half of the words) computed once, not per block.
        bf16 scoring: the region-word scores, the memory's scores, the attention-weighted MDU
        halves and the MDU's per-pair query half in bfloat16; softmax, gates and cosines in
        float32."""
        assert pooling is not None
        img, img_mask, img_cache = images.emb, images.mask, images.cache
        cap, cap_mask, cap_cache = captions.emb, captions.mask, captions.cache
        self._check_size(img)
        lowp = images.lowp is not None
        s = region_word_scores(images.product, captions.product)
        s = s.float() if lowp else s
        out = None
        if self.direction in ("t2i", "both"):
            steps = self._text_steps(
                s,
                img,
                img_mask,
                cap,
                cap_mask,
                pooling,
                img_gram=img_cache["gram"],
                mdu=(cap_cache["w_q_t2i"], cap_cache["w_a_t2i"], cap_cache["bias_t2i"]),
                q_half=cap_cache["q_half_t2i"],
                ws=ws,
                lowp=lowp,
            )
            out = torch.stack(steps).sum(dim=0)
        if self.direction in ("i2t", "both"):
            steps = self._image_steps(
                s,
                img,
                img_mask,
                cap,
                cap_mask,
                pooling,
                ctx=cap_cache["ctx_i2t"],
                cap_gram=cap_cache["gram"],
                w_q=cap_cache["w_q_i2t"],
                ws=ws,
                lowp=lowp,
            )
            part = torch.stack(steps).sum(dim=0)
            out = part if out is None else out + part
        assert out is not None
        return out

    def bytes_per_pair(self, n_regions: int, n_words: int, elem_size: int) -> int:
        """Workspace of one (image, caption) pair: per query fragment about ten live ``[d]``
        vectors (memory, the MDU's pre-activations [2d] and query half [2d], gate, candidate,
        new memory, temporaries), plus six ``[K, L]`` score buffers."""
        n_query = (n_words if self.direction in ("t2i", "both") else 0) + (
            n_regions if self.direction in ("i2t", "both") else 0
        )
        return elem_size * (10 * n_query * self.embed_size + 6 * n_regions * n_words)

    def extra_repr(self) -> str:
        return (
            f"direction={self.direction}, steps={self.steps}, "
            f"lambda_softmax={self.lambda_softmax}, renorm_memory={self.renorm_memory}, "
            f"embed_size={self.embed_size}, feature_norm={self.feature_norm}"
        )

    # --- the two directions -------------------------------------------------------------------

    def _check_size(self, img: Tensor) -> None:
        if img.shape[-1] != self.embed_size:
            raise ValueError(
                f"IMRAM was built for embed_size={self.embed_size} but got fragments of size "
                f"{img.shape[-1]}"
            )

    def _next_memory(
        self,
        mdu: MemoryDistillationUnit,
        w_q: Tensor,
        memory: Tensor,
        pre: Tensor,
        q_half: Tensor | None = None,
        lowp: bool = False,
    ) -> Tensor:
        """MDU update from ``pre`` = the attended half of the pre-activations (per pair);
        ``q_half`` = ``memory``'s query half when already known (``F.linear(memory, w_q)``);
        ``lowp`` (bf16 scoring): the per-pair memory's product with ``w_q`` in bfloat16.

        At inference with ``pre`` a contiguous workspace buffer of ``memory``'s dtype, the
        update runs in place in ``pre`` (query half accumulated by one ``addmm_``, then the
        gate and candidate activated in their halves and the candidate half overwritten by the
        new memory, which is returned as a view of ``pre``); otherwise out of place
        (autograd)."""
        d = self.embed_size
        if (
            torch.is_grad_enabled()
            or not pre.is_contiguous()
            or not memory.dtype == pre.dtype == w_q.dtype
        ):
            # in place: pre is a fresh product (bmm's backward does not need its output)
            pre = pre.add_(q_half if q_half is not None else F.linear(memory, w_q))
            memory = mdu.update(memory, pre)
            return l2n(memory) if self.renorm_memory else memory
        if q_half is not None:
            pre.add_(q_half)
        elif lowp and memory.shape[:-1] == pre.shape[:-1]:  # the MDU's largest product in bf16
            half = torch.mm(memory.reshape(-1, d).to(torch.bfloat16), w_q.to(torch.bfloat16).T)
            pre.view(-1, 2 * d).add_(half)
        elif memory.shape[:-1] == pre.shape[:-1]:  # per-pair memory: one GEMM pass into pre
            pre.view(-1, 2 * d).addmm_(memory.reshape(-1, d), w_q.T)
        else:
            pre.add_(F.linear(memory, w_q))
        gate, cand = pre[..., :d].sigmoid_(), pre[..., d:].tanh_()
        memory = torch.lerp(cand, memory, gate, out=cand)  # g * q + (1 - g) * cand
        return l2n(memory) if self.renorm_memory else memory

    def _text_steps(
        self,
        s: Tensor,
        img: Tensor,
        img_mask: Tensor,
        cap: Tensor,
        cap_mask: Tensor,
        pooling: nn.Module,
        img_gram: Tensor | None = None,
        mdu: tuple[Tensor, Tensor, Tensor] | None = None,
        q_half: Tensor | None = None,
        ws: Workspace | None = None,
        lowp: bool = False,
    ) -> list[Tensor]:
        """Text mode: the words' memory attends to the regions. Memory ``[B1, B2, L, d]``
        (``[B2, L, d]`` at step 1, shared by every image). ``mdu``: the MDU's stacked weights
        when already built; ``q_half``: its query half of the words ``[B2, L, 2d]``; ``ws``:
        inference workspace for the per-pair pre-activations and memory (:func:`_pre_buffer`);
        ``lowp`` (bf16 scoring): the per-pair products in bfloat16 (:func:`_bmm`)."""
        b1, k, b2, n = s.shape
        img_gram = gram(img) if img_gram is None else img_gram
        cap_sq = sq_norm(cap)
        memory, scores, out = cap, s, []
        for step in range(self.steps):
            alpha = t2i_weights(scores, img_mask, cap_mask, self.feature_norm, self.lambda_softmax)
            # cos(ORIGINAL word, att): the dot comes from the step-1 scores s, not the memory's
            words = t2i_cosine(s, alpha, img_gram, cap_sq)  # [B1, B2, L]
            out.append(pool_scores(pooling, words, cap_mask))
            if step == self.steps - 1:
                break
            if step == 0:  # the MDU's attended half of every region, once per block
                w_q, w_a, bias = self.mdu_t2i.fused_weights() if mdu is None else mdu
                ctx = F.linear(img, w_a, bias)  # [B1, K, 2d]
            # MDU(att) for att[i, j, w] = sum_r alpha[i, r, j, w] v[i, r]: [B1, B2*L, K] @ ctx
            a_t = alpha.reshape(b1, k, b2 * n).transpose(1, 2)
            pre = _bmm(a_t, ctx, lowp, out=_pre_buffer(ws, step, (b1, b2 * n), ctx))
            memory = self._next_memory(
                self.mdu_t2i,
                w_q,
                memory,
                pre.view(b1, b2, n, -1),
                q_half=q_half if step == 0 else None,
                lowp=lowp,
            )
            # memory against the regions: [B1, K, d] @ [B1, d, B2*L]
            scores = _bmm(img, memory.reshape(b1, b2 * n, -1).transpose(1, 2), lowp)
            scores = scores.view(b1, k, b2, n)
        return out

    def _image_steps(
        self,
        s: Tensor,
        img: Tensor,
        img_mask: Tensor,
        cap: Tensor,
        cap_mask: Tensor,
        pooling: nn.Module,
        ctx: Tensor | None = None,
        cap_gram: Tensor | None = None,
        w_q: Tensor | None = None,
        ws: Workspace | None = None,
        lowp: bool = False,
    ) -> list[Tensor]:
        """Image mode: the regions' memory attends to the words. Memory ``[B2, B1, K, d]``
        (``[B1, K, d]`` at step 1, shared by every caption). ``ctx``: the MDU's attended half
        of the words, ``[B2, L, 2d]``, and ``w_q`` the MDU's query half ``[2d, d]`` (both
        computed here unless both are given); ``ws``, ``lowp``: as in :meth:`_text_steps`."""
        b1, k, b2, n = s.shape
        cap_gram = gram(cap) if cap_gram is None else cap_gram
        img_sq = sq_norm(img)
        pool_mask = img_mask[:, None, :]
        memory, scores, out = img, s, []
        for step in range(self.steps):
            alpha = i2t_weights(scores, img_mask, cap_mask, self.feature_norm, self.lambda_softmax)
            regions = i2t_cosine(s, alpha, cap_gram, img_sq)  # [B1, B2, K]
            out.append(pool_scores(pooling, regions, pool_mask))
            if step == self.steps - 1:
                break
            if step == 0 and (ctx is None or w_q is None):  # the MDU's attended half of
                w_q, w_a, bias = self.mdu_i2t.fused_weights()  # every word, once per block
                ctx = F.linear(cap, w_a, bias)  # [B2, L, 2d]
            assert ctx is not None and w_q is not None
            # MDU(att) for att[j, i, r] = sum_w alpha[i, r, j, w] e[j, w]: [B2, B1*K, L] @ ctx
            a_t = alpha.permute(2, 0, 1, 3).reshape(b2, b1 * k, n)
            pre = _bmm(a_t, ctx, lowp, out=_pre_buffer(ws, step, (b2, b1 * k), ctx))
            memory = self._next_memory(
                self.mdu_i2t, w_q, memory, pre.view(b2, b1, k, -1), lowp=lowp
            )
            # memory against the words: [B2, B1*K, d] @ [B2, d, L], viewed as [B1, K, B2, L]
            scores = _bmm(memory.reshape(b2, b1 * k, -1), cap.transpose(1, 2), lowp)
            scores = scores.view(b2, b1, k, n).permute(1, 2, 0, 3)
        return out


def _bmm(a: Tensor, b: Tensor, lowp: bool, out: Tensor | None = None) -> Tensor:
    """``torch.bmm(a, b)``; ``lowp``: its operands in bfloat16 (float32 accumulation), the
    result float32 (into ``out`` when given)."""
    if not lowp:
        return torch.bmm(a, b, out=out)
    prod = torch.bmm(a.to(torch.bfloat16), b.to(torch.bfloat16))
    return prod.float() if out is None else out.copy_(prod)


def _pre_buffer(
    ws: Workspace | None, step: int, lead: tuple[int, int], ctx: Tensor
) -> Tensor | None:
    """Workspace buffer ``[*lead, 2d]`` for the MDU pre-activations of ``step`` (None without a
    workspace or under autograd: a fresh tensor). Two buffers alternate: the update leaves the
    new memory in the candidate half of its own step's buffer, which the next step still reads
    while it fills the other one. Reused buffers spare the page faults of fresh block-sized
    allocations."""
    if ws is None or torch.is_grad_enabled():
        return None
    return ws.get(f"imram_pre{step % 2}", (*lead, ctx.shape[-1]), ctx)
