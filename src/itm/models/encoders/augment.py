"""Size augmentation of fragment sets (docs/foundations.md, "Loss and training"; CHAN, VSE-infinity; training only).

Both functions work on a padded batch with its true lengths, are vectorised over the batch, and
return a new padded batch (trimmed to its longest item) with the new lengths. Kept items are
compacted to the front in their original order; slots past a new length are filled with zeros
(the pad id 0 for tokens). Randomness comes from ``generator`` (a ``torch.Generator``) when given,
else from torch's global generator (which Lightning's ``seed_everything`` seeds).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["augment_words", "drop_region_rows", "drop_regions"]


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) numbers of ``shape`` on ``like``'s device, drawn from ``generator``."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def _check_p(p: float, name: str) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {p}")


def _ensure_one(keep: Tensor, valid: Tensor, score: Tensor) -> Tensor:
    """Where a non-empty row keeps nothing, keep its valid item with the highest ``score``."""
    empty = ~keep.any(dim=1) & valid.any(dim=1)
    if bool(empty.any()):
        best = score.masked_fill(~valid, -1.0).argmax(dim=1)
        rescue = torch.zeros_like(keep).scatter_(1, best[:, None], True)
        keep = keep | (rescue & empty[:, None])
    return keep


def _compact(x: Tensor, keep: Tensor, fill: float | int = 0) -> tuple[Tensor, Tensor]:
    """Move the kept items of each row (axis 1) to the front in order, fill the rest, trim."""
    new_lengths = keep.sum(dim=1)
    # A stable sort of "dropped" flags puts kept items first without reordering them.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    size = max(int(new_lengths.max()), 1) if new_lengths.numel() else 1
    order = order[:, :size]
    index = order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    out = torch.gather(x, 1, index)
    slot_valid = torch.arange(size, device=x.device)[None, :] < new_lengths[:, None]
    out = out.masked_fill(~slot_valid.reshape(*slot_valid.shape, *([1] * (x.dim() - 2))), fill)
    return out, new_lengths


def drop_regions(
    x: Tensor, lengths: Tensor, p: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Drop each valid region independently with probability ``p``.

    At least one region of every non-empty image is kept (if all were drawn for dropping, the
    one with the highest random draw survives). Kept regions move to the front in their order.

    Args:
        x: region features ``[B, K, D]`` (slots past a length may hold anything).
        lengths: ``[B]`` counts of valid regions.
        p: drop probability in [0, 1]; 0 returns the inputs unchanged.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``(x' [B, K', D], new_lengths [B])`` with ``K' = max(new_lengths)``; ``new_lengths`` has
        the dtype and device of ``lengths``.
    """
    (out,), new_lengths = drop_region_rows((x,), lengths, p, generator)
    return out, new_lengths


def drop_region_rows(
    tensors: Sequence[Tensor],
    lengths: Tensor,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], Tensor]:
    """:func:`drop_regions` applied to several per-region tensors with ONE draw, so that they
    lose the same regions (features and PFAN positions, say).

    Args:
        tensors: ``[B, K, ...]`` tensors sharing ``B`` and ``K`` (any trailing shape / dtype).
        lengths: ``[B]`` counts of valid regions.
        p: drop probability in [0, 1]; 0 returns the inputs unchanged.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``([t' [B, K', ...] for each tensor], new_lengths [B])``.
    """
    _check_p(p, "region drop probability")
    x = tensors[0]
    for t in tensors[1:]:
        if t.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"per-region tensors must share [B, K]: {tuple(x.shape[:2])} vs "
                f"{tuple(t.shape[:2])}"
            )
    if p == 0.0 or x.shape[0] == 0:
        return list(tensors), lengths
    lens = lengths.to(x.device)
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]
    u = _rand(valid.shape, x, generator)
    keep = _ensure_one(valid & (u >= p), valid, u)
    outs = []
    for t in tensors:
        out, new_lengths = _compact(t, keep.to(t.device), 0.0)
        outs.append(out)
    return outs, new_lengths.to(lengths.device, lengths.dtype)


def augment_words(
    tokens: Tensor,
    lengths: Tensor,
    p: float,
    mask_id: int,
    vocab_size: int,
    n_special: int,
    split: tuple[float, float, float] = (0.5, 0.1, 0.4),
    keep_ends: bool = True,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
) -> tuple[Tensor, Tensor]:
    """Mask / replace / delete words of token-id captions (the CHAN / VSE-infinity recipe).

    Each valid token is chosen with probability ``p`` -- except the first and last token of each
    caption (``<start>``/``<end>`` or ``[CLS]``/``[SEP]``) when ``keep_ends`` -- and a chosen
    token becomes ``mask_id`` with probability ``split[0]``, a uniformly random id in
    ``[n_special, vocab_size)`` with probability ``split[1]``, and is deleted with probability
    ``split[2]``. Deleted tokens are removed and the rest compacted in order; a non-empty caption
    keeps at least one token (with ``keep_ends`` its two ends always stay).

    Args:
        tokens: ``[B, L]`` int64 token ids (slots past a length may hold anything).
        lengths: ``[B]`` caption lengths (counting the end tokens).
        p: probability that a word is augmented, in [0, 1]; 0 returns the inputs unchanged.
        mask_id: id written for "mask" (``<unk>`` for the SCAN vocabulary, ``[MASK]`` for BERT).
        vocab_size: random replacement ids are drawn below this.
        n_special: random replacement ids are drawn from this up (skips the special tokens).
        split: probabilities of (mask, random, delete); must sum to 1.
        keep_ends: never touch the first and last token of a caption.
        generator: optional ``torch.Generator`` for reproducible draws.
        pad_id: value written in slots past the new lengths.

    Returns:
        ``(tokens' [B, L'], new_lengths [B])`` with ``L' = max(new_lengths)``; ``new_lengths`` has
        the dtype and device of ``lengths``.
    """
    _check_p(p, "word augmentation probability")
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(
            f"split must be three probabilities (mask, random, delete) summing to 1, got {split}"
        )
    if split[1] > 0 and not 0 <= n_special < vocab_size:
        raise ValueError(
            f"random ids need 0 <= n_special < vocab_size, got {n_special}, {vocab_size}"
        )
    if p == 0.0 or tokens.shape[0] == 0:
        return tokens, lengths
    lens = lengths.to(tokens.device)
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    valid = pos < lens[:, None]
    eligible = valid & (pos >= 1) & (pos < lens[:, None] - 1) if keep_ends else valid
    u = _rand(tokens.shape, tokens, generator)
    chosen = eligible & (u < p)
    kind = _rand(tokens.shape, tokens, generator)
    to_mask = chosen & (kind < split[0])
    to_random = chosen & (kind >= split[0]) & (kind < split[0] + split[1])
    to_delete = chosen & ~to_mask & ~to_random
    device = generator.device if generator is not None else tokens.device
    random_ids = torch.randint(
        n_special, max(vocab_size, n_special + 1), tokens.shape, generator=generator, device=device
    ).to(tokens.device, tokens.dtype)
    out = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    out = torch.where(to_random, random_ids, out)
    keep = _ensure_one(valid & ~to_delete, valid, u)
    out, new_lengths = _compact(out, keep, pad_id)
    return out, new_lengths.to(lengths.device, lengths.dtype)
