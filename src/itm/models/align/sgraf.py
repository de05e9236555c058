"""SGRAF: similarity graph reasoning and attention filtration (Diao et al., AAAI 2021;
docs/sgraf.md).

A pair is scored by a small network over similarity VECTORS rather than by pooled cosines:

1. global vectors by self-attention with the mean as the query (:class:`SelfAttentionGlobal`;
   the image's with two BatchNorms, the caption's without);
2. each word attends to the regions (the shared t2i step of ``attention.py``, clipped_l2norm,
   lambda 9) and its attended vector is l2-normalised;
3. similarity vectors ``s_w = l2n(W_loc (a_w - e_w)^2 + b_loc)`` per valid word and
   ``s_glo = l2n(W_glo (v_glo - t_glo)^2 + b_glo)``: a graph of ``n + 1`` nodes, node 0 global;
4. ``sgr``: ``sgr_step`` rounds of graph reasoning, read out at node 0 (:class:`GraphStep`);
   ``saf``: a learned attention filter over the nodes (:class:`AttentionFiltration`);
5. score ``sigmoid(w_e . vector + b_e)`` in (0, 1).

``module: sgraf`` holds an SGR and a SAF head (``sgr_head.*``, ``saf_head.*``) and returns the
MEAN of their scores (the paper's SGRAF rows ensemble two separately trained models; the
recipes do that with ``eval.py`` and both checkpoints).

Cost. The projection ``W_loc`` of every word's squared difference cannot be factored (the
square of an attention mixture does not split into per-image and per-caption parts), so the
method is FLOP-bound. Two exact reductions are used everywhere:

* the edge logits ``(W_q s_p + b_q) . (W_k s_q + b_k)`` equal ``(A s_p + c) . s_q`` plus terms
  constant along the softmax axis ``q``, with ``A = W_k^T W_q`` and ``c = W_k^T b_q``: one
  ``m x m`` product per node instead of two;
* the read-out is node 0 after the last step, so the last step updates node 0 only.

Train mode follows the authors' batch semantics (methods.md section 10): the image
self-attention's BatchNorms take their statistics over all images of the call (region slot
``r`` over the images where ``r`` is valid and the ``d`` features), SAF's BatchNorm separately
for each caption over all images x that caption's valid nodes, with its running statistics
updated once per caption in caption order. The training forward scores the captions in runs
of equal length, each trimmed to its length (no padded word is computed), and bounds its memory
by activation checkpointing of chunks of a run beyond ``train_block_mb``; the statistics are
computed functionally, so recomputation never updates a running statistic twice.

Masks: ``img_mask [B1, K]``, ``cap_mask [B2, L]`` bool, True = valid; padded slots are zeroed
on entry and masked in every mean, softmax, norm and BatchNorm statistic.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from itm.models.align.attention import (
    masked_softmax,
    pair_scores,
    region_word_scores,
    t2i_weights,
)
from itm.models.align.base import AlignHead, Block
from itm.models.align.engine import Workspace
from itm.models.functional import L2_EPS, l2n

__all__ = [
    "MODULES",
    "SGRAF",
    "AttentionFiltration",
    "GraphStep",
    "SelfAttentionGlobal",
    "local_similarity",
]

MODULES = ("sgr", "saf", "sgraf")
#: the authors' l1norm eps (SAF's weights ``a / (sum a + eps)``)
L1_EPS = 1e-8
#: rows of the ``[rows, d]`` squared-difference tile processed at once on the inference path
#: (about 4 MB in float32: it stays in cache between its two passes and the projection)
TILE_ROWS = 1024


def _init_linear(layer: nn.Linear) -> None:
    """The authors' init: Xavier-uniform weight (bound sqrt(6 / (in + out))), zero bias."""
    bound = math.sqrt(6.0) / math.sqrt(layer.in_features + layer.out_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)


def _bn_eval(x: Tensor, bn: nn.BatchNorm1d, channels: slice | None = None) -> Tensor:
    """Eval-mode BatchNorm of ``x [..., C]`` with the running statistics of ``bn`` (channel
    last; ``channels`` selects the first ``C`` of ``bn``'s)."""
    sel = channels if channels is not None else slice(None)
    mean, var = bn.running_mean[sel], bn.running_var[sel]  # type: ignore[index]
    scale = bn.weight[sel] * torch.rsqrt(var + bn.eps)  # type: ignore[operator]
    return (x - mean) * scale + bn.bias[sel]  # type: ignore[index]


class SelfAttentionGlobal(nn.Module):
    """Self-attention with the mean as the query: one global vector per set (step 1).

    ``l_r = drop(tanh(BN_slot(local_fc(x_r))))``, ``g = drop(tanh(BN_d(global_fc(mean x))))``,
    ``w = softmax_r(common_fc(l_r * g))`` over the valid items, output ``l2n(sum_r w_r x_r)``
    (a weighting of the ORIGINAL items). The image's (``num_region`` given) has the two
    BatchNorms ``local_bn`` (one channel per region SLOT; its statistics run over the images and
    the features) and ``global_bn`` (over the images); the caption's has none.

    ``forward(x [B, N, d], mask [B, N]) -> [B, d]``; padded items must be zero in ``x``.
    """

    def __init__(self, embed_size: int, dropout: float, num_region: int | None = None) -> None:
        super().__init__()
        d = int(embed_size)
        self.local_fc = nn.Linear(d, d)
        self.global_fc = nn.Linear(d, d)
        self.common_fc = nn.Linear(d, 1)
        self.num_region = num_region
        if num_region is not None:
            self.local_bn = nn.BatchNorm1d(int(num_region))
            self.global_bn = nn.BatchNorm1d(d)
        self.drop = nn.Dropout(float(dropout))
        for layer in (self.local_fc, self.global_fc, self.common_fc):
            _init_linear(layer)

    def _slot_bn(self, x: Tensor, mask: Tensor) -> Tensor:
        """BN_slot of ``x [B, N, d]``: channel = region slot (axis 1)."""
        n = x.shape[1]
        assert self.num_region is not None
        if n > self.num_region:
            raise ValueError(
                f"SGRAF: images have {n} region slots but model.align.num_region="
                f"{self.num_region} (the image self-attention's BatchNorm slots); raise it"
            )
        bn, sel = self.local_bn, slice(0, n)
        if not self.training:
            return _bn_eval(x.transpose(1, 2), bn, sel).transpose(1, 2)
        # batch statistics per slot over the images where the slot is valid and the d features
        w = mask.to(x.dtype)[:, :, None]  # [B, N, 1]
        count = w.sum(dim=0).squeeze(-1) * x.shape[2]  # [N]
        safe = count.clamp_min(1.0)
        mean = (x * w).sum(dim=(0, 2)) / safe  # [N]
        centred = (x - mean[None, :, None]) * w
        var = (centred * centred).sum(dim=(0, 2)) / safe  # biased: normalising
        out = (x - mean[None, :, None]) * torch.rsqrt(var + bn.eps)[None, :, None]
        out = out * bn.weight[sel][None, :, None] + bn.bias[sel][None, :, None]
        with torch.no_grad():
            seen = count > 1
            if bool(seen.any()):
                unbiased = var.detach() * count / (count - 1).clamp_min(1.0)
                rm, rv = bn.running_mean, bn.running_var
                assert rm is not None and rv is not None and bn.num_batches_tracked is not None
                m = bn.momentum if bn.momentum is not None else 0.1
                new_m = (1 - m) * rm[sel] + m * mean.detach()
                new_v = (1 - m) * rv[sel] + m * unbiased
                rm[sel] = torch.where(seen, new_m, rm[sel])
                rv[sel] = torch.where(seen, new_v, rv[sel])
                bn.num_batches_tracked += 1
        return out

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        count = mask.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)
        mean = x.sum(dim=1) / count  # padded items are zero
        if self.num_region is None and not bool(mask.all()):  # the valid words only
            loc = x.new_zeros(*x.shape[:2], self.local_fc.out_features)
            loc[mask] = self.local_fc(x[mask])
        else:
            loc = self.local_fc(x)
        glo = self.global_fc(mean)
        if self.num_region is not None:
            loc = self._slot_bn(loc, mask)
            glo = F.batch_norm(
                glo,
                self.global_bn.running_mean,
                self.global_bn.running_var,
                self.global_bn.weight,
                self.global_bn.bias,
                self.training,
                self.global_bn.momentum if self.global_bn.momentum is not None else 0.1,
                self.global_bn.eps,
            )
            if self.training and self.global_bn.num_batches_tracked is not None:
                self.global_bn.num_batches_tracked += 1
        loc = self.drop(torch.tanh(loc))
        glo = self.drop(torch.tanh(glo))
        logits = self.common_fc(loc * glo[:, None, :]).squeeze(-1)  # [B, N]
        weights = masked_softmax(logits, mask, dim=1)
        return l2n((weights[:, :, None] * x).sum(dim=1))


class GraphStep(nn.Module):
    """One step of similarity graph reasoning over the nodes ``s [P, N, m]``:
    ``E[p, q] = softmax_q((W_q s_p + b_q) . (W_k s_q + b_k))`` over the valid nodes ``q`` (no
    1/sqrt(m)), then ``s_p <- ReLU(W_g (sum_q E[p, q] s_q) + b_g)``.

    Computed as ``softmax_q((A s_p + c) . s_q)`` with ``A = W_k^T W_q``, ``c = W_k^T b_q``
    (the dropped terms are constant along ``q``)."""

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        m = int(sim_dim)
        self.query = nn.Linear(m, m)
        self.key = nn.Linear(m, m)
        self.graph = nn.Linear(m, m)
        for layer in (self.query, self.key, self.graph):
            _init_linear(layer)

    def folded(self) -> tuple[Tensor, Tensor]:
        """``(A, c)``: the edge logits are ``(A s_p + c) . s_q`` (``F.linear(s, A, c)``)."""
        wk = self.key.weight
        c = wk.T @ self.query.bias
        if torch.is_grad_enabled():  # b_k cancels in the softmax: its gradient is exactly 0,
            c = c + 0.0 * self.key.bias  # but it takes part (DDP expects every parameter used)
        return wk.T @ self.query.weight, c

    def forward(self, s: Tensor, node_mask: Tensor, only_first: bool = False) -> Tensor:
        """``s [P, N, m]``, ``node_mask [P or 1, N]`` -> ``[P, N, m]`` (``only_first``: node 0's
        update only, ``[P, m]``)."""
        a, c = self.folded()
        q = F.linear(s[:, :1] if only_first else s, a, c)  # [P, N or 1, m]
        logits = torch.bmm(q, s.transpose(1, 2))  # [P, N or 1, N]
        edges = masked_softmax(logits, node_mask[:, None, :], dim=2)
        out = F.relu(self.graph(torch.bmm(edges, s)))
        return out[:, 0] if only_first else out


class AttentionFiltration(nn.Module):
    """SAF: ``a_p = sigmoid(BN_1(attn(s_p)))``, ``beta = a / (sum_valid a + 1e-8)``, output
    ``l2n(sum_p beta_p s_p)``. ``bn`` (BatchNorm1d(1)) is applied functionally: eval mode its
    running statistics; train mode statistics per caption (see :meth:`batch_stats`)."""

    def __init__(self, sim_dim: int) -> None:
        super().__init__()
        self.attn = nn.Linear(int(sim_dim), 1)
        self.bn = nn.BatchNorm1d(1)
        _init_linear(self.attn)

    def batch_stats(self, z: Tensor, node_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-caption statistics of the logits ``z [B1, B2, N]`` over the images x the
        caption's valid nodes (``node_mask [B2, N]``): (mean, biased var, count), each
        ``[B2]``."""
        w = node_mask.to(z.dtype)[None]  # [1, B2, N]
        count = w.sum(dim=2)[0] * z.shape[0]
        mean = (z * w).sum(dim=(0, 2)) / count
        centred = (z - mean[None, :, None]) * w
        var = (centred * centred).sum(dim=(0, 2)) / count
        return mean, var, count

    def filter(self, s: Tensor, z: Tensor, node_mask: Tensor) -> Tensor:
        """``s [B1, B2, N, m]`` and normalised logits ``z [B1, B2, N]`` -> ``[B1, B2, m]``."""
        a = torch.sigmoid(z) * node_mask.to(z.dtype)[None]
        beta = a / (a.sum(dim=2, keepdim=True) + L1_EPS)
        return l2n(torch.einsum("ijn,ijnm->ijm", beta, s))

    def update_running(self, means: Tensor, variances: Tensor, counts: Tensor) -> None:
        """The running statistics after one update per caption, in caption order (momentum,
        unbiased variance), as the reference's per-caption calls leave them."""
        bn = self.bn
        if means.numel() == 0:
            return
        m = bn.momentum if bn.momentum is not None else 0.1
        n = means.numel()
        decay = (1 - m) ** torch.arange(n - 1, -1, -1, dtype=means.dtype, device=means.device)
        unbiased = variances * counts / (counts - 1).clamp_min(1.0)
        with torch.no_grad():
            rm, rv = bn.running_mean, bn.running_var
            assert rm is not None and rv is not None and bn.num_batches_tracked is not None
            keep = (1 - m) ** n
            rm.mul_(keep).add_((m * decay * means.detach()).sum().to(rm.dtype))
            rv.mul_(keep).add_((m * decay * unbiased.detach()).sum().to(rv.dtype))
            bn.num_batches_tracked += n


def local_similarity(
    img: Tensor, img_mask: Tensor, cap: Tensor, cap_mask: Tensor, lambda_softmax: float
) -> tuple[Tensor, Tensor]:
    """Words attend to regions (t2i, clipped_l2norm) and their attended vectors are
    l2-normalised: ``(alpha [B1, K, B2, L], a [B1, B2, L, d])`` (padded slots zero in the
    inputs)."""
    s = region_word_scores(img, cap)
    alpha = t2i_weights(s, img_mask, cap_mask, "clipped_l2norm", lambda_softmax)
    b1, k, b2, n = alpha.shape
    att = torch.bmm(alpha.reshape(b1, k, b2 * n).transpose(1, 2), img)  # [B1, B2*L, d]
    return alpha, l2n(att.view(b1, b2, n, img.shape[-1]))


def _length_runs(lens: list[int], b1: int) -> list[tuple[int, int, int, int, int]]:
    """Runs of equal length in the sorted caption lengths ``lens`` (longest first), for ``b1``
    images: ``(j0, g, n, w0, off)`` = first caption, captions, words each, first packed word
    row, first row of the run's ``[g, b1, n + 1, m]`` nodes in the packed node buffer."""
    runs: list[tuple[int, int, int, int, int]] = []
    j = w0 = off = 0
    while j < len(lens):
        n, j1 = lens[j], j
        while j1 < len(lens) and lens[j1] == n:
            j1 += 1
        g = j1 - j
        runs.append((j, g, n, w0, off))
        w0, off, j = w0 + g * n, off + g * b1 * (n + 1), j1
    return runs


def _packed_words(cap: Tensor, mask: Tensor, order: Tensor) -> Tensor:
    """The valid words of ``cap [B2, L, d]`` (``mask [B2, L]``), captions in ``order``:
    ``[W, d]`` (one gather)."""
    n = cap.shape[1]
    rows = (order[:, None] * n + torch.arange(n, device=cap.device))[mask[order]]
    return cap.reshape(-1, cap.shape[2]).index_select(0, rows)


class SGRAF(AlignHead):
    """SGRAF's similarity-vector head (methods.md section 10; docs/sgraf.md).

    Args:
        module: ``sgr`` (graph reasoning), ``saf`` (attention filtration) or ``sgraf`` (an SGR
            and a SAF head, the mean of their scores).
        embed_size: d.
        sim_dim: m, the size of the similarity vectors (256).
        sgr_step: reasoning steps of ``sgr`` (3), each with its own weights.
        lambda_softmax: the t2i attention's inverse temperature (9, fixed in the authors' code).
        num_region: region slots of the image self-attention's BatchNorm (36); K <= num_region.
        dropout: Dropout of the self-attention embeddings in training (0.4).
        train_block_mb: the training forward scores chunks of captions (within runs of equal
            length) under activation checkpointing when a whole batch's per-pair activations
            would exceed this (MB); 0 = never checkpoint.

    Parameters (architecture.md, SGRAF): ``img_global.{local_fc, local_bn, global_fc,
    global_bn, common_fc}``, ``txt_global.{local_fc, global_fc, common_fc}``, ``sim_local``,
    ``sim_global``, ``sim_eval``, and ``sgr.{k}.{query, key, graph}`` or ``saf.{attn, bn}``;
    with ``module: sgraf`` the same under ``sgr_head.`` and ``saf_head.``.

    Scores are in (0, 1), laid out ``[n_images, n_captions]``; the pooling group is ignored.
    """

    pooling_role = "fixed"
    fixed_pooling_name = "its own network (the pooling group is ignored)"
    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset({"dropout", "train_block_mb"})
    supports_bf16 = False
    bf16_refusal = (
        "its cost is the per-word d -> sim_dim projection of squared differences, implemented "
        "in float32 only"
    )

    def __init__(
        self,
        module: str = "sgr",
        embed_size: int = 1024,
        sim_dim: int = 256,
        sgr_step: int = 3,
        lambda_softmax: float = 9.0,
        num_region: int = 36,
        dropout: float = 0.4,
        train_block_mb: float = 1024.0,
    ) -> None:
        super().__init__()
        if module not in MODULES:
            raise ValueError(f"model.align.module must be one of {MODULES}, got {module!r}")
        if int(sgr_step) != sgr_step or sgr_step < 1:
            raise ValueError(f"model.align.sgr_step must be a positive integer, got {sgr_step!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.align.dropout must lie in [0, 1), got {dropout}")
        self.module = module
        self.embed_size, self.sim_dim = int(embed_size), int(sim_dim)
        self.sgr_step, self.lambda_softmax = int(sgr_step), float(lambda_softmax)
        self.num_region, self.dropout = int(num_region), float(dropout)
        self.train_block_mb = float(train_block_mb)
        kw = dict(
            embed_size=embed_size,
            sim_dim=sim_dim,
            sgr_step=sgr_step,
            lambda_softmax=lambda_softmax,
            num_region=num_region,
            dropout=dropout,
            train_block_mb=train_block_mb,
        )
        if module == "sgraf":
            self.sgr_head = SGRAF("sgr", **kw)  # type: ignore[arg-type]
            self.saf_head = SGRAF("saf", **kw)  # type: ignore[arg-type]
            return
        d, m = self.embed_size, self.sim_dim
        self.img_global = SelfAttentionGlobal(d, dropout, self.num_region)
        self.txt_global = SelfAttentionGlobal(d, dropout)
        self.sim_local = nn.Linear(d, m)
        self.sim_global = nn.Linear(d, m)
        self.sim_eval = nn.Linear(m, 1)
        for layer in (self.sim_local, self.sim_global, self.sim_eval):
            _init_linear(layer)
        if module == "sgr":
            self.sgr = nn.ModuleList(GraphStep(m) for _ in range(self.sgr_step))
        else:
            self.saf = AttentionFiltration(m)

    # --- pooling: ignored -------------------------------------------------------------------

    def bind_pooling(self, pooling: nn.Module | None) -> None:
        """SGRAF scores with its own network: any pooling module is accepted and ignored."""

    # --- the reference path (training, and eval on small inputs) ----------------------------

    def _check(self, img: Tensor) -> None:
        if img.shape[-1] != self.embed_size:
            raise ValueError(
                f"SGRAF was built for embed_size={self.embed_size} but got fragments of size "
                f"{img.shape[-1]}"
            )

    def forward(
        self,
        img: Tensor,
        img_mask: Tensor,
        cap: Tensor,
        cap_mask: Tensor,
        pooling: nn.Module | None = None,
    ) -> Tensor:
        """``img [B1, K, d]``, ``img_mask [B1, K]``, ``cap [B2, L, d]``, ``cap_mask [B2, L]``
        -> scores ``[B1, B2]`` in (0, 1)."""
        if self.module == "sgraf":
            a = self.sgr_head(img, img_mask, cap, cap_mask)
            b = self.saf_head(img, img_mask, cap, cap_mask)
            return (a + b) / 2
        self._check(img)
        img = img.masked_fill(~img_mask[..., None], 0.0)
        cap = cap.masked_fill(~cap_mask[..., None], 0.0)
        v_glo = self.img_global(img, img_mask)  # [B1, d]: statistics over all images
        t_glo = self.txt_global(cap, cap_mask)  # [B2, d]: once, so dropout draws as one call
        b1 = img.shape[0]
        # captions in runs of equal length (longest first), each trimmed to its length: no
        # padded word is computed; chunks under checkpointing only beyond train_block_mb
        lens = cap_mask.sum(dim=1)
        order = torch.argsort(lens, descending=True, stable=True)
        runs = _length_runs(lens[order].tolist(), b1)
        elem, k = img.element_size(), img.shape[1]
        total = sum(g * b1 * self.activation_bytes(k, n, elem) for _, g, n, _, _ in runs)
        limited = torch.is_grad_enabled() and 0 < self.train_block_mb * 2**20 < total
        parts, all_stats = [], []
        for j0, g, n, _, _ in runs:
            step = self._train_chunk(b1, k, n, elem) if limited else g
            for c0 in range(j0, j0 + g, step):
                idx = order[c0 : min(j0 + g, c0 + step)]
                n_keep = max(n, 1)  # a run of empty captions keeps one (masked) slot
                args = (img, img_mask, v_glo, t_glo[idx], cap[idx, :n_keep], cap_mask[idx, :n_keep])
                if limited:
                    score, stats = checkpoint(self._score_captions, *args, use_reentrant=False)
                else:
                    score, stats = self._score_captions(*args)
                parts.append(score)
                all_stats.append(stats)
        inv = torch.argsort(order)  # sorted position of each caption
        if self.module == "saf" and self.training:
            means, var, counts = (torch.cat([s[i] for s in all_stats])[inv] for i in range(3))
            self.saf.update_running(means, var, counts)
        return torch.cat(parts, dim=1)[:, inv]

    def _train_chunk(self, b1: int, k: int, n: int, elem: int) -> int:
        """Captions per chunk of the autograd forward (all of them unless the batch's per-pair
        activations exceed ``train_block_mb``)."""
        if not torch.is_grad_enabled() or self.train_block_mb <= 0:
            return 1 << 60
        per_caption = b1 * self.activation_bytes(k, n, elem)
        return max(1, int(self.train_block_mb * 2**20 // max(per_caption, 1)))

    def activation_bytes(self, k: int, n: int, elem: int) -> int:
        """Autograd activations of one pair (what the training forward keeps for backward):
        about six ``[L, d]`` tensors (attended, normalised, difference, square), six
        ``[K, L]`` attention tensors and per step a few ``[N, m]`` / ``[N, N]`` ones."""
        d, m, nodes = self.embed_size, self.sim_dim, n + 1
        steps = self.sgr_step if self.module == "sgr" else 1
        return elem * (6 * n * d + 6 * k * n + steps * (6 * nodes * m + 3 * nodes * nodes))

    def _score_captions(
        self,
        img: Tensor,
        img_mask: Tensor,
        v_glo: Tensor,
        t_glo: Tensor,
        cap: Tensor,
        cap_mask: Tensor,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Scores ``[B1, B2]`` of all images against these captions (global vectors
        ``v_glo [B1, d]``, ``t_glo [B2, d]``), and (SAF, train mode) the per-caption BatchNorm
        statistics (empty tensors otherwise). Deterministic, so checkpointing may recompute it."""
        _, att = local_similarity(img, img_mask, cap, cap_mask, self.lambda_softmax)
        s_loc = l2n(self.sim_local((att - cap[None]) ** 2))  # [B1, B2, L, m]
        s_glo = l2n(self.sim_global((v_glo[:, None] - t_glo[None]) ** 2))  # [B1, B2, m]
        nodes = torch.cat([s_glo[:, :, None], s_loc], dim=2)  # [B1, B2, N, m]
        node_mask = F.pad(cap_mask, (1, 0), value=True)  # [B2, N]
        empty = img.new_zeros(0)
        stats = (empty, empty, empty)
        if self.module == "sgr":
            vec = self._reason(nodes, node_mask)
        else:
            z = self.saf.attn(nodes).squeeze(-1)  # [B1, B2, N]
            if self.training:
                mean, var, count = self.saf.batch_stats(z, node_mask)
                bn = self.saf.bn
                zn = (z - mean[None, :, None]) * torch.rsqrt(var + bn.eps)[None, :, None]
                z = zn * bn.weight + bn.bias
                stats = (mean.detach(), var.detach(), count)
            else:
                z = _bn_eval(z[..., None], self.saf.bn)[..., 0]
            vec = self.saf.filter(nodes, z, node_mask)
        return torch.sigmoid(self.sim_eval(vec)).squeeze(-1), stats

    def graph_steps(self) -> list[GraphStep]:
        """SGR's reasoning steps, in order (module ``sgr``)."""
        return [step for step in self.sgr if isinstance(step, GraphStep)]

    def _reason(self, nodes: Tensor, node_mask: Tensor) -> Tensor:
        """SGR over ``nodes [B1, B2, N, m]``: node 0 after the last step, ``[B1, B2, m]``."""
        b1, b2, n, m = nodes.shape
        s = nodes.reshape(b1 * b2, n, m)
        mask = node_mask.repeat(b1, 1)  # [B1*B2, N]: pair p = i * B2 + j
        for k, layer in enumerate(self.graph_steps()):
            s = layer(s, mask, only_first=k == self.sgr_step - 1)
        return s.view(b1, b2, m)

    def similarity_vectors(
        self, img: Tensor, img_mask: Tensor, cap: Tensor, cap_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The graph's nodes before reasoning, ``[B1, B2, N, m]`` (node 0 = global; padded
        word nodes zero), and the normalised attended vectors ``[B1, B2, L, d]`` (for tests
        and inspection; a single-module head)."""
        img = img.masked_fill(~img_mask[..., None], 0.0)
        cap = cap.masked_fill(~cap_mask[..., None], 0.0)
        v_glo, t_glo = self.img_global(img, img_mask), self.txt_global(cap, cap_mask)
        _, att = local_similarity(img, img_mask, cap, cap_mask, self.lambda_softmax)
        s_loc = l2n(self.sim_local((att - cap[None]) ** 2)) * cap_mask[None, :, :, None]
        s_glo = l2n(self.sim_global((v_glo[:, None] - t_glo[None]) ** 2))
        return torch.cat([s_glo[:, :, None], s_loc], dim=2), att * cap_mask[None, :, :, None]

    # --- the alignment picture ---------------------------------------------------------------

    def alignment(self, img: Tensor, cap: Tensor) -> Tensor:
        """Each word's t2i attention over the regions (the local alignment step), ``[L, K]``;
        rows sum to 1."""
        s, ones_i, ones_c = pair_scores(img, cap)
        return t2i_weights(s, ones_i, ones_c, "clipped_l2norm", self.lambda_softmax)[0, :, 0].T

    # --- block-wise inference ------------------------------------------------------------------

    def _heads(self) -> list[SGRAF]:
        return [self.sgr_head, self.saf_head] if self.module == "sgraf" else [self]

    def prepare_images(self, img: Tensor, img_mask: Tensor) -> dict[str, Tensor]:
        """Per image: the Gram matrix ``gram [B1, K, K]`` and the global vector ``glo_<module>``
        of each sub-head (eval mode: the
        BatchNorms use running statistics, so it is per image; in train mode blocks fall back
        to :meth:`forward`). Also folds each head's inference constants once per scoring run
        (:meth:`_fold`)."""
        if self.training:
            return {}
        out = {"gram": img @ img.transpose(1, 2)}  # [B1, K, K] (padded regions zero)
        for h in self._heads():
            h._fold()
            out[f"glo_{h.module}"] = h.img_global(img, img_mask)
        return out

    def prepare_captions(self, cap: Tensor, cap_mask: Tensor) -> dict[str, Tensor]:
        if self.training:
            return {}
        return {f"glo_{h.module}": h.txt_global(cap, cap_mask) for h in self._heads()}

    def _fold(self) -> None:
        """Inference constants of a single-module head, kept until the next scoring run:
        transposed projections, SGR's folded edge weights (:meth:`GraphStep.folded`), SAF's
        eval BatchNorm as one affine map."""
        consts: dict[str, Tensor] = {
            "loc_t": self.sim_local.weight.T.contiguous(),
            "glo_t": self.sim_global.weight.T.contiguous(),
            "eval_t": self.sim_eval.weight.T.contiguous(),
        }
        if self.module == "sgr":
            for k, layer in enumerate(self.graph_steps()):
                a, c = layer.folded()
                consts[f"a{k}"], consts[f"c{k}"] = a.T.contiguous(), c
                consts[f"g{k}"] = layer.graph.weight.T.contiguous()
                consts[f"gb{k}"] = layer.graph.bias
        else:
            bn = self.saf.bn
            assert bn.running_var is not None and bn.running_mean is not None
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            consts["saf_w"] = (self.saf.attn.weight.T * scale).contiguous()  # [m, 1]
            consts["saf_b"] = (self.saf.attn.bias - bn.running_mean) * scale + bn.bias
        self._consts = consts

    def score_block(
        self, images: Block, captions: Block, pooling: nn.Module | None, ws: Workspace
    ) -> Tensor:
        """Eval-mode scores of one block (train mode: :meth:`forward` on the block)."""
        if self.training or not images.cache:
            return super().score_block(images, captions, pooling, ws)
        out = None
        for h in self._heads():
            part = h._block(images, captions, ws)
            out = part if out is None else (out + part) / 2
        assert out is not None
        return out

    def _block(self, images: Block, captions: Block, ws: Workspace) -> Tensor:
        """One single-module head on one block on the inference path (padded slots zero).

        Only VALID words are computed: the block's captions are grouped into runs of equal
        length (longest first) and their words packed, ``W = sum n_j`` rows. One product gives
        every region-word score ``[B1, K, W]``; the attention runs in place on it (the l2 norm
        across each caption's words per run); then per tile of about :data:`TILE_ROWS` word
        rows the attended vectors (one batched product), their normalisation and the squared
        difference (two passes in cache) and the ``d -> m`` projection (one product) write the
        local nodes into a packed, caption-major node buffer: run ``r`` (``g`` captions of
        ``n`` words) holds ``[g, B1, n + 1, m]`` contiguous rows, so the graph of every pair of
        a run is a dense ``[n + 1, m]`` matrix without padding or masks."""
        c = self._consts
        img, cap = images.emb, captions.emb
        b1, k, d = img.shape
        b2 = cap.shape[0]
        m = self.sim_dim
        if b1 == 0 or b2 == 0:
            return img.new_zeros(b1, b2)
        lens = captions.mask.sum(dim=1)
        order = torch.argsort(lens, descending=True, stable=True)
        runs = _length_runs(lens[order].tolist(), b1)
        words = sum(g * n for _, g, n, _, _ in runs)
        # [W, d]: the valid words, caption-major in sorted order (once per caption block)
        cap_p = ws.memo(
            "sgraf_words", captions.key, lambda: _packed_words(cap, captions.mask, order)
        )
        # t2i weights in place: lrelu, l2 across each caption's words, x lambda, softmax over
        # the valid regions
        s = (img.reshape(b1 * k, d) @ cap_p.T).view(b1, k, words)
        s = F.leaky_relu_(s, 0.1)
        for _, g, n, w0, _ in runs:
            if n == 0:
                continue
            v = s[:, :, w0 : w0 + g * n].view(b1, k, g, n)
            inv = torch.linalg.vector_norm(v, dim=3, keepdim=True).add_(L2_EPS)
            v.div_(inv.div_(self.lambda_softmax))
        if not bool(images.mask.all()):
            s.masked_fill_(~images.mask[:, :, None], float("-inf"))
        alpha = s.softmax(dim=1)  # [B1, K, W]
        del s
        rows_total = runs[-1][4] + runs[-1][1] * b1 * (runs[-1][2] + 1)
        nodes = ws.get("sgraf_nodes", (rows_total, m), img)
        key = f"glo_{self.module}"
        glo = images.cache[key][:, None] - captions.cache[key][order]  # [B1, B2, d]
        glo_n = torch.addmm(
            self.sim_global.bias,
            glo.square_().view(b1 * b2, d),
            c["glo_t"],
            out=ws.get("sgraf_glo", (b1 * b2, m), img),
        ).view(b1, b2, m)
        del glo
        for j0, g, n, _, off in runs:
            dst = nodes[off : off + g * b1 * (n + 1)].view(g, b1, n + 1, m)
            dst[:, :, 0] = glo_n[:, j0 : j0 + g].transpose(0, 1)
        # 1 / ||att_w|| from the image Gram matrix (||att||^2 = alpha^T G alpha), folded into
        # the weights, so that ONE batched product per tile writes a_w / ||a_w|| - e_w
        if words:
            sq = (torch.bmm(images.cache["gram"], alpha).mul_(alpha)).sum(dim=1)  # [B1, W]
            alpha.mul_(sq.clamp_min_(0.0).sqrt_().add_(L2_EPS).reciprocal_()[:, None])
            a_t = alpha.transpose(1, 2)  # [B1, W, K]
            neg_e = cap_p.neg()
            # on the CPU tiles that stay in cache; on a GPU the whole block (fewer launches)
            tile = b1 if img.device.type != "cpu" else max(1, TILE_ROWS // words)
            t_max = min(tile, b1)
            buf = ws.get("sgraf_tile", (t_max, words, d), img)
            pbuf = ws.get("sgraf_proj", (t_max * words, m), img)
            for i0 in range(0, b1, tile):
                i1 = min(b1, i0 + tile)
                x = torch.baddbmm(neg_e, a_t[i0:i1], img[i0:i1], out=buf[: i1 - i0]).square_()
                proj = torch.mm(x.view(-1, d), c["loc_t"], out=pbuf[: (i1 - i0) * words])
                proj = proj.view(i1 - i0, words, m)
                for _, g, n, w0, off in runs:
                    if n == 0:
                        continue
                    dst = nodes[off : off + g * b1 * (n + 1)].view(g, b1, n + 1, m)
                    src = proj[:, w0 : w0 + g * n].view(i1 - i0, g, n, m).transpose(0, 1)
                    torch.add(src, self.sim_local.bias, out=dst[:, i0:i1, 1:])
                del x, proj
            del a_t
        del alpha
        nodes.div_(torch.linalg.vector_norm(nodes, dim=1, keepdim=True).add_(L2_EPS))
        if self.module == "sgr":
            vec = self._reason_eval(nodes, runs, b1, ws)
        else:
            a = torch.mm(nodes, c["saf_w"]).view(-1).add_(c["saf_b"]).sigmoid_()  # [R]
            vec = ws.get("sgraf_vec", (b1 * b2, m), img)
            for j0, g, n, _, off in runs:
                p, rows = g * b1, g * b1 * (n + 1)
                beta = a[off : off + rows].view(p, 1, n + 1)
                beta.div_(beta.sum(dim=2, keepdim=True).add_(L1_EPS))
                src = nodes[off : off + rows].view(p, n + 1, m)
                torch.bmm(beta, src, out=vec[j0 * b1 : j0 * b1 + p].view(p, 1, m))
            vec.div_(torch.linalg.vector_norm(vec, dim=1, keepdim=True).add_(L2_EPS))
        score = torch.addmm(self.sim_eval.bias, vec, c["eval_t"]).sigmoid_()  # [B2 * B1]
        out = img.new_empty(b1, b2)
        out[:, order] = score.view(b2, b1).T
        return out

    def _reason_eval(
        self, s: Tensor, runs: list[tuple[int, int, int, int, int]], b1: int, ws: Workspace
    ) -> Tensor:
        """SGR on the inference path over the packed nodes ``s [R, m]`` of :meth:`_block`
        (``runs``: see :func:`_length_runs`; pair ``p = j * B1 + i``, ``j`` in sorted caption
        order) -> node 0 after the last step, ``[P, m]``. Every node of a run is valid, so no
        masks: the shared ``m x m`` maps run as one product over all nodes, the per-pair edge
        products as one batched product per run."""
        c = self._consts
        m = s.shape[1]
        pairs = sum(g for _, g, _, _, _ in runs) * b1
        for k in range(self.sgr_step):
            if k == self.sgr_step - 1:  # the read-out is node 0: update it only
                s0 = ws.get("sgraf_s0", (pairs, m), s)
                for j0, g, n, _, off in runs:
                    view = s[off : off + g * b1 * (n + 1)].view(g * b1, n + 1, m)
                    s0[j0 * b1 : (j0 + g) * b1] = view[:, 0]
                q = torch.addmm(c[f"c{k}"], s0, c[f"a{k}"], out=ws.get("sgraf_q0", (pairs, m), s))
                mix = ws.get("sgraf_mix", (pairs, m), s)
                for j0, g, n, _, off in runs:
                    p = g * b1
                    view = s[off : off + p * (n + 1)].view(p, n + 1, m)
                    logits = torch.bmm(q[j0 * b1 : j0 * b1 + p].view(p, 1, m), view.transpose(1, 2))
                    torch.bmm(
                        logits.softmax(dim=2), view, out=mix[j0 * b1 : j0 * b1 + p].view(p, 1, m)
                    )
                return torch.addmm(c[f"gb{k}"], mix, c[f"g{k}"]).relu_()
            rows = s.shape[0]
            # two reused buffers take turns: the step's input s, and q then the step's output
            free = ws.get("sgraf_q" if k % 2 == 0 else "sgraf_nodes", (rows, m), s)
            q = torch.addmm(c[f"c{k}"], s, c[f"a{k}"], out=free)
            mix = ws.get("sgraf_mix", (rows, m), s)
            for _, g, n, _, off in runs:
                p, end = g * b1, off + g * b1 * (n + 1)
                view = s[off:end].view(p, n + 1, m)
                logits = torch.bmm(q[off:end].view(p, n + 1, m), view.transpose(1, 2))
                torch.bmm(logits.softmax(dim=2), view, out=mix[off:end].view(p, n + 1, m))
            s = torch.addmm(c[f"gb{k}"], mix, c[f"g{k}"], out=free).relu_()  # q is spent
        return s

    def bytes_per_pair(self, n_regions: int, n_words: int, elem_size: int) -> int:
        """Inference workspace of one pair: the ``[K, L]`` scores and weights, the ``[L, d]``
        rows of the squared-difference tile, the pair's ``[L + 1, m]`` nodes and the
        reasoning's (SGR) or filter's (SAF) temporaries; ``sgraf`` runs its two heads one after
        the other, so the larger of the two."""
        nodes, d = n_words + 1, self.embed_size
        return max(
            elem_size
            * (
                6 * n_regions * n_words
                + 2 * d
                + 2 * n_words * d
                + nodes * h.sim_dim * (6 if h.module == "sgr" else 3)
                + 3 * nodes * nodes
            )
            for h in self._heads()
        )

    def extra_repr(self) -> str:
        return (
            f"module={self.module}, embed_size={self.embed_size}, sim_dim={self.sim_dim}, "
            f"sgr_step={self.sgr_step}, lambda_softmax={self.lambda_softmax}, "
            f"num_region={self.num_region}, dropout={self.dropout}"
        )
