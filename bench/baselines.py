"""Loop baselines that follow the STRUCTURE of the authors' released scoring code.

Written for this project (not copied): like the reference implementations, they loop over the
captions in Python; each caption (sliced to its own length) is repeated for every image of a
block of images, attends all of them at once with small batched products, and the attended
vectors ``[n_img, n_query, d]`` are materialised before the cosine. They are the yardstick of
``bench/bench_scoring.py`` (and checked against the engine on a small input there and in the
tests). Images are taken at their full padded size, as the references do (every image of the
public data has 36 regions); pass ``img_lens`` only to check that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_BLOCK = 128


def _l2norm(x: Tensor, dim: int) -> Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def _cosine(x: Tensor, y: Tensor, dim: int) -> Tensor:
    num = (x * y).sum(dim)
    den = (x.norm(dim=dim) * y.norm(dim=dim)).clamp(min=1e-8)
    return num / den


def func_attention(query: Tensor, context: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Reference-style attention: ``query [B, Lq, d]``, ``context [B, Lc, d]`` ->
    (attended ``[B, Lq, d]``, weights ``[B, Lq, Lc]``); clipped_l2norm across the queries."""
    attn = torch.bmm(context, query.transpose(1, 2))  # [B, Lc, Lq]
    attn = _l2norm(F.leaky_relu(attn, 0.1), dim=2)
    attn = torch.softmax(attn.transpose(1, 2) * lam, dim=2)  # [B, Lq, Lc]
    return torch.bmm(attn, context), attn


def _focal_equal(attn: Tensor) -> Tensor:
    """BFAN's equal focal selection and renormalisation over the context axis."""
    n = attn.shape[-1]
    keep = (n * attn - attn.sum(-1, keepdim=True)) > 0
    keep = torch.where(keep.any(-1, keepdim=True), keep, torch.ones_like(keep))
    kept = attn * keep
    return kept / kept.sum(-1, keepdim=True)


def _lse(x: Tensor, lam: float, rescale: bool = True) -> Tensor:
    out = torch.log(torch.exp(x * lam).sum(dim=1))
    return out / lam if rescale else out


def _blocks(img: Tensor):
    for i0 in range(0, img.shape[0], IMAGE_BLOCK):
        yield i0, img[i0 : i0 + IMAGE_BLOCK]


def scan_t2i(img: Tensor, cap: Tensor, cap_lens: Tensor, lam: float = 9.0, lse: float = 6.0):
    """SCAN t2i (words attend to regions), LSE pooling: ``[n_img, n_cap]``."""
    out = img.new_empty(img.shape[0], cap.shape[0])
    for i0, ims in _blocks(img):
        for j in range(cap.shape[0]):
            cap_j = cap[j, : int(cap_lens[j])].unsqueeze(0).repeat(ims.shape[0], 1, 1)
            att, _ = func_attention(cap_j, ims, lam)
            out[i0 : i0 + ims.shape[0], j] = _lse(_cosine(cap_j, att, 2), lse)
    return out


def scan_i2t(img: Tensor, cap: Tensor, cap_lens: Tensor, lam: float = 4.0):
    """SCAN i2t (regions attend to words), average pooling: ``[n_img, n_cap]``."""
    out = img.new_empty(img.shape[0], cap.shape[0])
    for i0, ims in _blocks(img):
        for j in range(cap.shape[0]):
            cap_j = cap[j, : int(cap_lens[j])].unsqueeze(0).repeat(ims.shape[0], 1, 1)
            att, _ = func_attention(ims, cap_j, lam)
            out[i0 : i0 + ims.shape[0], j] = _cosine(ims, att, 2).mean(1)
    return out


def bfan(img: Tensor, cap: Tensor, cap_lens: Tensor, lam: float = 20.0):
    """BFAN (equal focal, both directions, mean aggregation): ``[n_img, n_cap]``."""
    out = img.new_empty(img.shape[0], cap.shape[0])
    for i0, ims in _blocks(img):
        for j in range(cap.shape[0]):
            cap_j = cap[j, : int(cap_lens[j])].unsqueeze(0).repeat(ims.shape[0], 1, 1)
            _, w = func_attention(cap_j, ims, lam)
            att = torch.bmm(_focal_equal(w), ims)
            t2i = _cosine(cap_j, att, 2).mean(1)
            _, w = func_attention(ims, cap_j, lam)
            att = torch.bmm(_focal_equal(w), cap_j)
            i2t = _cosine(ims, att, 2).mean(1)
            out[i0 : i0 + ims.shape[0], j] = t2i + i2t
    return out


def chan_t2i(img: Tensor, cap: Tensor, cap_lens: Tensor, lam: float = 10.0):
    """CHAN VHA (hard region per word), LSE without rescale: ``[n_img, n_cap]``."""
    out = img.new_empty(img.shape[0], cap.shape[0])
    for i0, ims in _blocks(img):
        for j in range(cap.shape[0]):
            cap_j = cap[j, : int(cap_lens[j])]
            s = torch.matmul(ims, cap_j.T)  # [n_img, K, n]
            out[i0 : i0 + ims.shape[0], j] = _lse(s.max(dim=1).values, lam, rescale=False)
    return out


def _mdu(gate: torch.nn.Linear, cand: torch.nn.Linear, query: Tensor, att: Tensor) -> Tensor:
    z = torch.cat([query, att], dim=-1)
    g = torch.sigmoid(gate(z))
    return g * query + (1 - g) * torch.tanh(cand(z))


def imram(img: Tensor, cap: Tensor, cap_lens: Tensor, head, lam: float = 9.0):
    """IMRAM full mode (text + image), ``steps`` steps, the memory updated after every step as
    the reference loop does: ``[n_img, n_cap]``. ``head`` supplies the MDU weights."""
    steps = head.steps
    out = img.new_empty(img.shape[0], cap.shape[0])
    for i0, ims in _blocks(img):
        for j in range(cap.shape[0]):
            cap_j = cap[j, : int(cap_lens[j])].unsqueeze(0).repeat(ims.shape[0], 1, 1)
            total = 0.0
            query = cap_j
            for _ in range(steps):
                att, _ = func_attention(query, ims, lam)
                total = total + _cosine(cap_j, att, 2).mean(1)
                query = _mdu(head.mdu_t2i.gate, head.mdu_t2i.candidate, query, att)
            query = ims
            for _ in range(steps):
                att, _ = func_attention(query, cap_j, lam)
                total = total + _cosine(ims, att, 2).mean(1)
                query = _mdu(head.mdu_i2t.gate, head.mdu_i2t.candidate, query, att)
            out[i0 : i0 + ims.shape[0], j] = total
    return out


def _l1norm(x: Tensor, dim: int) -> Tensor:
    return x / (x.abs().sum(dim=dim, keepdim=True) + 1e-8)


def _sgraf_image_globals(head, img: Tensor) -> Tensor:
    """The authors' VisualSA on ALL images of the call at once (its BatchNorm modules called
    as modules: train mode takes batch statistics and updates the running ones)."""
    sa = head.img_global
    loc = sa.drop(torch.tanh(sa.local_bn(sa.local_fc(img))))
    glo = sa.drop(torch.tanh(sa.global_bn(sa.global_fc(img.mean(1)))))
    weights = torch.softmax(sa.common_fc(loc * glo[:, None]).squeeze(2), dim=1)
    return _l2norm((weights[:, :, None] * img).sum(1), -1)


def _sgraf_caption(head, ims: Tensor, img_glo: Tensor, cap_i: Tensor, lam: float) -> Tensor:
    """One caption ``cap_i [1, n, d]`` against the images ``ims [n_img, K, d]``: the authors'
    loop body (TextSA, SCAN attention, similarity vectors, SGR or SAF, sigmoid) -> ``[n_img]``."""
    sa = head.txt_global
    loc = sa.drop(torch.tanh(sa.local_fc(cap_i)))
    glo = sa.drop(torch.tanh(sa.global_fc(cap_i.mean(1))))
    weights = torch.softmax(sa.common_fc(loc * glo[:, None]).squeeze(2), dim=1)
    cap_glo = _l2norm((weights[:, :, None] * cap_i).sum(1), -1)
    cap_rep = cap_i.repeat(ims.shape[0], 1, 1)
    context, _ = func_attention(cap_rep, ims, lam)
    context = _l2norm(context, -1)
    sim_loc = _l2norm(head.sim_local(torch.pow(context - cap_rep, 2)), -1)
    sim_glo = _l2norm(head.sim_global(torch.pow(img_glo - cap_glo, 2)), -1)
    emb = torch.cat([sim_glo.unsqueeze(1), sim_loc], 1)
    if head.module == "sgr":
        for layer in head.sgr:
            edge = torch.softmax(torch.bmm(layer.query(emb), layer.key(emb).transpose(1, 2)), -1)
            emb = F.relu(layer.graph(torch.bmm(edge, emb)))
        vec = emb[:, 0, :]
    else:
        attn = head.saf.bn(head.saf.attn(emb).permute(0, 2, 1))  # [n_img, 1, n + 1]
        attn = _l1norm(torch.sigmoid(attn), -1)
        vec = _l2norm(torch.matmul(attn, emb).squeeze(1), -1)
    return torch.sigmoid(head.sim_eval(vec)).squeeze(1)


def sgraf(img: Tensor, cap: Tensor, cap_lens: Tensor, head, lam: float = 9.0) -> Tensor:
    """SGRAF (one module, ``sgr`` or ``saf``) as the authors' ``EncoderSimilarity``: the image
    self-attention once over all images of the call, then a Python loop over the captions, each
    sliced to its length, repeated for every image, its similarity vectors materialised:
    ``[n_img, n_cap]``. In train mode this is the authors' training semantics (BatchNorm
    statistics over all images; SAF's per caption); images at their full size ``K =
    num_region``, as the authors'. ``head``: an ``itm`` SGRAF head supplying the weights."""
    img_glo = _sgraf_image_globals(head, img)
    cols = [
        _sgraf_caption(head, img, img_glo, cap[j, : int(cap_lens[j])].unsqueeze(0), lam)
        for j in range(cap.shape[0])
    ]
    return torch.stack(cols, dim=1)


def contrastive_loss(sims: Tensor, margin: float = 0.2) -> Tensor:
    """VSE++ hinge with hardest negatives, sum over the batch (as the references)."""
    diag = sims.diag().view(-1, 1)
    cost_c = (margin + sims - diag).clamp(min=0)
    cost_i = (margin + sims - diag.t()).clamp(min=0)
    eye = torch.eye(sims.shape[0], dtype=torch.bool)
    cost_c = cost_c.masked_fill(eye, 0)
    cost_i = cost_i.masked_fill(eye, 0)
    return cost_c.max(1)[0].sum() + cost_i.max(0)[0].sum()


__all__ = [
    "bfan",
    "chan_t2i",
    "contrastive_loss",
    "func_attention",
    "imram",
    "scan_i2t",
    "scan_t2i",
    "sgraf",
]
