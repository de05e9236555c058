"""The attention step shared by SCAN, BFAN, IMRAM and SGRAF (docs/foundations.md), written once.

Query set ``Q`` (``m`` items), context set ``C`` (``s`` items), temperature ``lambda``:

1. raw scores ``a[p, q] = c_p . q_q``;
2. ``feature_norm`` across the QUERY axis (per context item, over the valid queries):
   ``clipped_l2norm`` = leaky-ReLU(0.1) then l2 normalisation (the authors' default),
   ``l2norm``, ``clipped``, ``softmax``, ``no_norm``;
3. weights ``alpha[q, p]`` = softmax over the valid CONTEXT items of ``lambda * normed[p, q]``;
4. attended vector ``att_q = sum_p alpha[q, p] c_p``.

``t2i``: the queries are words, the context regions; ``i2t`` the reverse.

Layout. All region-word scores of ``B1`` images and ``B2`` captions come from ONE matrix product
and live in ``s [B1, K, B2, L]`` with ``s[i, r, j, w] = v_{i,r} . e_{j,w}``. Reductions over
regions (axis 1) then run over a non-innermost axis with a long contiguous inner axis, and the
image Gram product is one batched product. The cosine of a query with its attended vector never
needs ``att`` itself (the Gram identity): ``q . att = sum_p alpha_p (c_p . q)`` and
``||att||^2 = alpha^T G alpha`` with ``G`` the context set's Gram matrix.

Masks: ``img_mask [B1, K]`` and ``cap_mask [B2, L]`` are bool, True = valid. Invalid slots may hold
any finite values; no function here lets them reach a valid result or its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from itm.models.functional import L2_EPS

__all__ = [
    "COS_EPS",
    "FEATURE_NORMS",
    "attended",
    "cosine_from_parts",
    "feature_norm",
    "gram",
    "i2t_cosine",
    "i2t_weights",
    "masked_softmax",
    "pair_scores",
    "region_word_scores",
    "sq_norm",
    "t2i_cosine",
    "t2i_weights",
]

FEATURE_NORMS = ("clipped_l2norm", "l2norm", "softmax", "clipped", "no_norm")
#: ``cos(x, y) = x.y / max(||x|| ||y||, COS_EPS)``
COS_EPS = 1e-8


def region_word_scores(img: Tensor, cap: Tensor) -> Tensor:
    """``s [B1, K, B2, L]`` from one matrix product of ``img [B1*K, d]`` by ``cap [d, B2*L]``."""
    b1, k, d = img.shape
    b2, n, _ = cap.shape
    return (img.reshape(b1 * k, d) @ cap.reshape(b2 * n, d).T).view(b1, k, b2, n)


def sq_norm(x: Tensor) -> Tensor:
    """Squared l2 norm over the last axis: ``[..., d] -> [...]``."""
    return (x * x).sum(dim=-1)


def gram(x: Tensor) -> Tensor:
    """Per-set Gram matrix ``x x^T``: ``[B, N, d] -> [B, N, N]``."""
    return x @ x.transpose(1, 2)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` restricted to ``mask`` (True = valid); invalid entries get weight 0."""
    return torch.where(mask, logits, logits.new_full((), float("-inf"))).softmax(dim=dim)


def feature_norm(s: Tensor, kind: str, dim: int, query_mask: Tensor) -> Tensor:
    """Normalise attention scores across the QUERY axis ``dim`` (step 2).

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


def cosine_from_parts(dot: Tensor, q_sq: Tensor, att_sq: Tensor) -> Tensor:
    """``cos = dot / max(||q|| ||att||, eps)`` from the dot product and the squared norms."""
    return dot / torch.sqrt((q_sq * att_sq).clamp_min(COS_EPS * COS_EPS))


def t2i_weights(
    s: Tensor, img_mask: Tensor, cap_mask: Tensor, kind: str, lambda_softmax: float
) -> Tensor:
    """Words attend to regions: ``alpha [B1, K, B2, L]``, softmax over valid regions (axis 1);
    the feature norm runs across each caption's valid words (axis 3)."""
    normed = feature_norm(s, kind, dim=3, query_mask=cap_mask[None, None])
    return masked_softmax(lambda_softmax * normed, img_mask[:, :, None, None], dim=1)


def i2t_weights(
    s: Tensor, img_mask: Tensor, cap_mask: Tensor, kind: str, lambda_softmax: float
) -> Tensor:
    """Regions attend to words: ``alpha [B1, K, B2, L]``, softmax over valid words (axis 3);
    the feature norm runs across each image's valid regions (axis 1)."""
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


def pair_scores(img: Tensor, cap: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One pair of VALID fragments, ``img [K, d]`` and ``cap [L, d]``, in the block layout:
    ``(s [1, K, 1, L], img_mask [1, K], cap_mask [1, L])`` (masks all True); what the heads'
    ``alignment`` pictures start from."""
    s = region_word_scores(img[None], cap[None])
    ones = img.new_ones((1, img.shape[0]), dtype=torch.bool)
    return s, ones, cap.new_ones((1, cap.shape[0]), dtype=torch.bool)


def attended(alpha: Tensor, img: Tensor) -> Tensor:
    """The t2i attended vectors themselves, for heads that need them (SGRAF):
    ``att[i, j, w] = sum_r alpha[i, r, j, w] v[i, r]``, ``alpha [B1, K, B2, L]``,
    ``img [B1, K, d]`` -> ``[B1, B2, L, d]`` (one batched product per image)."""
    b1, k, b2, n = alpha.shape
    att = torch.bmm(alpha.reshape(b1, k, b2 * n).transpose(1, 2), img)  # [B1, B2*L, d]
    return att.view(b1, b2, n, img.shape[-1])
