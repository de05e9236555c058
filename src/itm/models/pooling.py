"""Pooling over a masked set axis (docs/foundations.md, "Pooling").

Every pooling module maps ``x [..., N, D]`` with ``mask [..., N]`` (True = valid item; the mask
only needs to broadcast against ``x.shape[:-1]``) to ``[..., D]``. Values at invalid positions may
be arbitrary finite numbers: they never reach the result, nor its gradient. A set of scalar
fragment scores is the case ``D = 1`` (see :func:`pool_scores`).

Numerics (tested in ``tests/test_numerics.py``):

- an EMPTY set (no valid item) pools to 0 with every module, with a finite (zero) gradient;
- float16 / bfloat16 inputs are reduced in float32 (sums, log-sum-exp) and the result is cast
  back, so ``LSEPool(20)`` neither overflows nor loses the small terms of the sum;
- LSE is max-shifted: any finite ``lambda * x`` is safe.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["AvgPool", "LSEPool", "MaxPool", "SetPooling", "SumPool", "pool_scores"]


class SetPooling(nn.Module):
    """Base class: ``forward(x [..., N, D], mask [..., N]) -> [..., D]``."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _valid(x: Tensor, mask: Tensor) -> Tensor:
    """``mask`` broadcast to ``x`` with a trailing unit axis: ``[..., N, 1]`` (bool)."""
    return mask.unsqueeze(-1).expand(*x.shape[:-1], 1)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _work_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (reductions and exp/log run in it), else ``x``'s."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


class AvgPool(SetPooling):
    """Mean over the valid items."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        valid = _valid(x, mask)
        work = _work_dtype(x)
        total = torch.where(valid, x, x.new_zeros(())).sum(dim=-2, dtype=work)
        count = valid.sum(dim=-2).clamp_min(1).to(work)
        return (total / count).to(x.dtype)


class SumPool(SetPooling):
    """Sum over the valid items."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        total = torch.where(_valid(x, mask), x, x.new_zeros(())).sum(dim=-2, dtype=_work_dtype(x))
        return total.to(x.dtype)


class MaxPool(SetPooling):
    """Maximum over the valid items (0 for an empty set)."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if x.shape[-2] == 0:
            return x.new_zeros(*x.shape[:-2], x.shape[-1])
        out = torch.where(_valid(x, mask), x, x.new_full((), float("-inf"))).amax(dim=-2)
        # an empty set gives -inf above; inputs are finite, so -inf marks exactly those
        return torch.where(torch.isneginf(out), out.new_zeros(()), out)


class LSEPool(SetPooling):
    """Log-sum-exp pooling ``(1/lambda) log sum_n exp(lambda x_n)`` over the valid items.

    Computed with a max shift, so large ``lambda * x`` does not overflow. ``rescale=False`` drops
    the ``1/lambda`` factor (CHAN's released recipe: ``log sum exp(x / 0.1)``).

    Args:
        lambda_lse: temperature lambda (SCAN: 6 for t2i, 5 / 20 for i2t; CHAN: 10).
        rescale: multiply by ``1/lambda`` (SCAN) or not (CHAN).
    """

    def __init__(self, lambda_lse: float = 6.0, rescale: bool = True) -> None:
        super().__init__()
        self.lambda_lse = float(lambda_lse)
        self.rescale = bool(rescale)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        valid = _valid(x, mask)
        xw = x.to(_work_dtype(x))  # float32 for half inputs: lambda * x and exp/log/sum
        z = torch.where(valid, xw * self.lambda_lse, xw.new_full((), float("-inf")))
        if x.shape[-2] == 0:
            return x.new_zeros(*x.shape[:-2], x.shape[-1])
        shift = z.amax(dim=-2, keepdim=True).detach()
        # An empty set has shift -inf: use 0 there (then every term is exp(-inf) = 0).
        shift = torch.where(torch.isneginf(shift), shift.new_zeros(()), shift)
        # Shifted exponentials of invalid items are exp(-inf) = 0 exactly.
        total = torch.exp(z - shift).sum(dim=-2)
        empty = total == 0  # only an empty set: a valid item's term is exp(0) = 1 at its max
        total = torch.where(empty, total.new_ones(()), total)  # log(1) = 0, finite gradient
        out = torch.log(total) + shift.squeeze(-2)
        out = out / self.lambda_lse if self.rescale else out
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"lambda_lse={self.lambda_lse}, rescale={self.rescale}"


def pool_scores(pooling: nn.Module, scores: Tensor, mask: Tensor) -> Tensor:
    """Pool scalar fragment scores ``scores [..., N]`` with ``mask [..., N]`` -> ``[...]``."""
    return pooling(scores.unsqueeze(-1), mask).squeeze(-1)


class GPOPool(SetPooling):
    """Generalized pooling operator (VSE-infinity, Chen et al. CVPR 2021), docs/vse_infinity.md.

    Each dimension is sorted independently in descending order over the valid items, and the
    ``k``-th largest value gets the weight ``theta_k`` (``k = 0..N-1``); the weights depend only
    on the number ``N`` of valid items of the set: sinusoidal positional encoding of the
    positions ``0..N-1`` (float32, as the authors build it) -> bidirectional GRU run packed over
    the ``N`` positions, the two directions averaged -> bias-free ``scorer`` -> softmax over the
    ``N`` positions of ``score / temperature``. Padded positions get weight exactly 0. Output:
    ``sum_k theta_k * (k-th largest)``, a learned interpolation between max and mean.

    The weights of every length ``0..N`` (``N`` = padded set size) come from ONE packed GRU call
    over ``N`` sequences (no host sync, no per-set GRU), then each set picks the row of its own
    valid count; the mask need not be a prefix (only its count matters).

    Args:
        pe_dim: size of the positional encoding (even), the GRU input.
        hidden: GRU hidden size (each direction).
        temperature: softmax temperature of the position scores.
    """

    def __init__(self, pe_dim: int = 32, hidden: int = 32, temperature: float = 0.1) -> None:
        super().__init__()
        if pe_dim % 2 != 0:
            raise ValueError(f"pe_dim must be even, got {pe_dim}")
        self.pe_dim = int(pe_dim)
        self.hidden = int(hidden)
        self.temperature = float(temperature)
        self.gru = nn.GRU(self.pe_dim, self.hidden, batch_first=True, bidirectional=True)
        self.scorer = nn.Linear(self.hidden, 1, bias=False)

    def positional_encoding(self, length: int) -> Tensor:
        """Sinusoidal encoding ``[length, pe_dim]`` (float32): sin at even, cos at odd columns."""
        device = self.scorer.weight.device
        pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
        freq = torch.arange(0, self.pe_dim, 2, dtype=torch.float32, device=device)
        freq = torch.exp(freq * (-math.log(10000.0) / self.pe_dim))
        angle = pos * freq  # [length, pe_dim / 2]
        return torch.stack((angle.sin(), angle.cos()), dim=-1).reshape(length, self.pe_dim)

    def weight_table(self, max_len: int) -> Tensor:
        """``[max_len + 1, max_len]``: row ``n`` = weights of a set of ``n`` valid items (row 0
        is all zeros), zero past position ``n - 1``."""
        param = self.scorer.weight
        table = param.new_zeros(max_len + 1, max_len)
        if max_len == 0:
            return table
        pe = self.positional_encoding(max_len).to(param.dtype)
        # Sequence i is the prefix of length max_len - i (descending, as packing wants).
        lens = torch.arange(max_len, 0, -1)
        packed = nn.utils.rnn.pack_padded_sequence(
            pe.expand(max_len, max_len, self.pe_dim), lens, batch_first=True
        )
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=max_len)
        h = (out[..., : self.hidden] + out[..., self.hidden :]) / 2
        scores = self.scorer(h).squeeze(-1) / self.temperature  # [max_len, max_len]
        valid = torch.arange(max_len, device=param.device)[None, :] < lens.to(param.device)[:, None]
        weights = torch.where(valid, scores, scores.new_full((), float("-inf"))).softmax(dim=-1)
        # Row n of the table = sequence of length n = row max_len - n of ``weights``.
        return torch.cat((table[:1], weights.flip(0).to(table.dtype)), dim=0)

    def weights(self, lengths: Tensor, max_len: int) -> Tensor:
        """Per-set weights ``[B, max_len]`` for ``lengths [B]`` (0 past each length)."""
        return self.weight_table(max_len)[lengths.long().clamp(0, max_len)]

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        *lead, n, d = x.shape
        if n == 0:
            return x.new_zeros(*lead, d)
        valid = mask.expand(*lead, n).reshape(-1, n)  # [M, N]
        flat = x.reshape(-1, n, d)  # [M, N, D]
        count = valid.sum(dim=-1)  # [M]
        theta = self.weight_table(n)[count].to(x.dtype)  # [M, N], 0 past each count
        # Valid items first, each dimension descending; the -inf fillers land past each count.
        ranked = torch.where(valid[..., None], flat, flat.new_full((), float("-inf")))
        ranked = ranked.sort(dim=1, descending=True).values
        filled = torch.arange(n, device=x.device)[None, :, None] < count[:, None, None]
        ranked = torch.where(filled, ranked, ranked.new_zeros(()))
        return (theta[..., None] * ranked).sum(dim=1).reshape(*lead, d)

    def extra_repr(self) -> str:
        return f"pe_dim={self.pe_dim}, hidden={self.hidden}, temperature={self.temperature}"


__all__ += ["GPOPool"]


def _flat_sets(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """``x [..., N, D]``, ``mask`` (broadcastable to ``[..., N]``) -> ``x [M, N, D]``,
    ``valid [M, N]`` and the leading shape."""
    *lead, n, d = x.shape
    valid = mask.expand(*lead, n).reshape(-1, n)
    return x.reshape(-1, n, d), valid, lead


class LastPool(SetPooling):
    """The LAST valid item of each set (VSRN's caption vector: the text GRU's output at the
    caption's last word). Parameter-free; an empty set gives 0. The mask need not be a prefix:
    the item at the last True position is taken."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        flat, valid, lead = _flat_sets(x, mask)
        n, d = flat.shape[1:]
        if n == 0:
            return x.new_zeros(*lead, d)
        pos = torch.arange(1, n + 1, device=x.device)
        last = (pos * valid).amax(dim=1)  # [M]: 1-based position of the last valid item, 0 if none
        picked = flat[torch.arange(flat.shape[0], device=x.device), (last - 1).clamp_min(0)]
        picked = torch.where((last > 0)[:, None], picked, picked.new_zeros(()))
        return picked.reshape(*lead, d)


class GRULastPool(SetPooling):
    """VSRN's global semantic reasoning ("GSR"): a GRU reads the valid items in their stored
    order; the result is its hidden state after the last one (docs/vsrn.md).

    With ``final_bn`` (the authors' F30K model) a BatchNorm1d over the pooled vectors follows;
    in training its statistics are those of the batch of sets. The output is not normalised
    (the ``global`` head l2-normalises it). The valid items of a set need not be a prefix: they
    are read in their order. The GRU runs packed over each set's own items; an empty set gives
    0 (before ``bn``).

    Args:
        embed_size: item size d (the GRU's input and hidden size).
        final_bn: BatchNorm1d(d) on the result (VSRN F30K: true; COCO: false).
    """

    def __init__(self, embed_size: int = 1024, final_bn: bool = False) -> None:
        super().__init__()
        self.embed_size = int(embed_size)
        self.gru = nn.GRU(self.embed_size, self.embed_size, batch_first=True)
        self.bn = nn.BatchNorm1d(self.embed_size) if final_bn else None

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        flat, valid, lead = _flat_sets(x, mask)
        m, n, d = flat.shape
        if m == 0 or n == 0:
            return x.new_zeros(*lead, d)
        count = valid.sum(dim=1)
        # valid items to the front in their order (a prefix mask leaves the set unchanged)
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
        flat = flat.gather(1, order[..., None].expand(m, n, d))
        packed = nn.utils.rnn.pack_padded_sequence(
            flat, count.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, hidden = self.gru(packed)  # [1, M, d], in the input order
        out = torch.where((count > 0)[:, None], hidden[0], hidden.new_zeros(()))
        if self.bn is not None:
            out = self.bn(out)
        return out.reshape(*lead, d)

    def extra_repr(self) -> str:
        return f"embed_size={self.embed_size}, final_bn={self.bn is not None}"


__all__ += ["GRULastPool", "LastPool"]
