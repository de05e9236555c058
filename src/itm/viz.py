"""Region-word alignment pictures: what a trained head looks at.

Two public helpers, used by the W&B callback (:class:`itm.callbacks.AlignmentImages`) and by
``notebooks/alignment.ipynb``:

- :func:`attention_map` -> ``np.ndarray [L, K]`` (words x regions) for one (image, caption) pair,
- :func:`plot_attention` -> a matplotlib ``Figure`` (heat map with word labels; with region boxes,
  one panel per word where each box is drawn with alpha = its attention).

What the map holds is the head's own picture of alignment, its
:meth:`~itm.models.align.base.AlignHead.alignment` (documented per head: e.g. SCAN's soft
attention of its first direction, BFAN's focal weights, CHAN's hard assignment, IMRAM's first
step, no attention but fragment cosines for the ``global`` head); a new head brings its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "attention_from_embeddings",
    "attention_map",
    "figure_to_array",
    "plot_attention",
    "token_labels",
]


def _as_tensor(x: Any, dtype: torch.dtype | None = None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


@torch.no_grad()
def attention_from_embeddings(head: Any, img: Tensor, cap: Tensor) -> np.ndarray:
    """Region-word map ``[L, K]`` of one pair from its VALID fragment embeddings.

    Args:
        head: an alignment head (``model.similarity.align``).
        img: ``[K, d]`` region embeddings (valid regions only).
        cap: ``[L, d]`` word embeddings (valid words only).

    Returns:
        float ``np.ndarray [L, K]``: the head's :meth:`~itm.models.align.base.AlignHead.alignment`.
    """
    return head.alignment(img.float(), cap.float()).cpu().numpy()


@torch.no_grad()
def attention_map(
    model: Any,
    img: Any,
    img_len: int | None,
    cap: Any,
    cap_len: int | None,
    image_inputs: dict[str, Any] | None = None,
) -> np.ndarray:
    """Words x regions map ``[L, K]`` of a model for one (image, caption) pair.

    Args:
        model: an :class:`~itm.models.module.ITMModule` (anything with ``encode_images``,
            ``encode_captions`` and ``similarity.align``).
        img: region features ``[K, D]`` (or ``[1, K, D]``), tensor or array.
        img_len: valid regions (``None``: all ``K``).
        cap: token ids ``[L]`` (or ``[1, L]``), as the data module encodes them.
        cap_len: valid tokens (``None``: all ``L``).
        image_inputs: the per-region inputs the image encoder reads besides the features
            (PFAN: ``{"positions": [K, W]}``), each ``[K, ...]`` or ``[1, K, ...]``.

    Returns:
        float ``np.ndarray [cap_len, img_len]``: row ``w`` belongs to token ``w``.
    """
    img_t = _as_tensor(img, torch.float32)
    cap_t = _as_tensor(cap, torch.int64)
    if img_t.dim() == 2:
        img_t = img_t[None]
    if cap_t.dim() == 1:
        cap_t = cap_t[None]
    k = int(img_len) if img_len is not None else img_t.shape[1]
    n = int(cap_len) if cap_len is not None else cap_t.shape[1]
    device = next(model.parameters()).device
    img_t, cap_t = img_t[:, :k].to(device), cap_t[:, :n].to(device)
    extra = {}
    for name, value in (image_inputs or {}).items():
        t = _as_tensor(value, torch.float32)
        extra[name] = (t[None] if t.dim() == 2 else t)[:, :k].to(device)
    was_training = model.training
    model.eval()
    try:
        emb_i, lens_i = model.encode_images(img_t, torch.tensor([k], device=device), **extra)
        emb_c, lens_c = model.encode_captions(cap_t, torch.tensor([n], device=device))
    finally:
        model.train(was_training)
    emb_i, emb_c = emb_i[0, : int(lens_i[0])], emb_c[0, : int(lens_c[0])]
    return attention_from_embeddings(model.similarity.align, emb_i, emb_c)


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """One label per token id: a word vocabulary's words (``<start>``/``<end>`` included) or a
    BERT tokenizer's word pieces."""
    ids = [int(i) for i in ids]
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "convert_ids_to_tokens"):
        return list(inner.convert_ids_to_tokens(ids))
    idx2word = getattr(tokenizer, "idx2word", None)
    if isinstance(idx2word, dict):
        return [str(idx2word.get(i, "<unk>")) for i in ids]
    return [tokenizer.decode([i], skip_special=False) for i in ids]


def plot_attention(
    att: np.ndarray,
    words: Sequence[str] | None = None,
    boxes: np.ndarray | None = None,
    title: str | None = None,
    max_word_panels: int = 6,
    highlight: Sequence[int | None] | None = None,
):
    """Render a words x regions map.

    Args:
        att: ``[L, K]`` map (:func:`attention_map`).
        words: ``L`` token labels (y axis).
        boxes: optional ``[K, 4]`` region boxes ``(x1, y1, x2, y2)``: adds one panel per word
            (the ``max_word_panels`` words with the most peaked attention) where region ``r`` is
            a filled box of alpha ``att[w, r] / max_r att[w, r]`` on a blank canvas.
        title: figure title.
        max_word_panels: most word panels drawn with boxes.
        highlight: optional per word a region index to outline on the heat map (e.g. the
            planted region of a synthetic concept word; ``None`` = nothing).

    Returns:
        a ``matplotlib.figure.Figure`` (not attached to pyplot: safe in callbacks and threads;
        Jupyter displays it with ``display(fig)``).
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    att = np.asarray(att, dtype=np.float64)
    n_words, n_regions = att.shape
    words = list(words) if words is not None else [str(i) for i in range(n_words)]
    panels: list[int] = []
    if boxes is not None:
        boxes = np.asarray(boxes, dtype=np.float64)[:n_regions]
        peak = att.max(axis=1) - att.mean(axis=1)
        panels = sorted(np.argsort(-peak, kind="stable")[:max_word_panels].tolist())
    n_cols = 1 + len(panels)
    fig = Figure(figsize=(max(4.0, 0.35 * n_regions + 2.0) + 2.6 * len(panels), 0.3 * n_words + 2))
    ax = fig.add_subplot(1, n_cols, 1)
    signed = att.min() < 0
    vmax = float(np.abs(att).max()) or 1.0
    im = ax.imshow(
        att,
        aspect="auto",
        cmap="RdBu_r" if signed else "viridis",
        vmin=-vmax if signed else 0.0,
        vmax=vmax,
        interpolation="nearest",
    )
    ax.set_yticks(range(n_words))
    ax.set_yticklabels(words, fontsize=8)
    ax.set_xticks(range(n_regions))
    ax.set_xticklabels([str(r) for r in range(n_regions)], fontsize=7)
    ax.set_xlabel("region")
    if highlight is not None:
        for w, r in enumerate(highlight):
            if r is not None and 0 <= int(r) < n_regions:
                ax.add_patch(
                    Rectangle((int(r) - 0.5, w - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5)
                )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if boxes is not None:
        x_max = float(max(boxes[:, 2].max(), 1.0))
        y_max = float(max(boxes[:, 3].max(), 1.0))
        for i, w in enumerate(panels):
            pax = fig.add_subplot(1, n_cols, 2 + i)
            row = att[w] - (att[w].min() if signed else 0.0)
            row = row / (row.max() or 1.0)
            for r in np.argsort(row):  # strongest drawn last (on top)
                x1, y1, x2, y2 = boxes[r]
                pax.add_patch(
                    Rectangle(
                        (x1, y1),
                        x2 - x1,
                        y2 - y1,
                        facecolor="tab:orange",
                        edgecolor="0.4",
                        alpha=float(np.clip(row[r], 0.02, 1.0)),
                        lw=0.5,
                    )
                )
            pax.set_xlim(0, x_max)
            pax.set_ylim(y_max, 0)
            pax.set_aspect("equal")
            pax.set_xticks([])
            pax.set_yticks([])
            pax.set_title(words[w], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def figure_to_array(fig: Any) -> np.ndarray:
    """Rasterise a matplotlib figure into ``uint8 [H, W, 3]`` (Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
