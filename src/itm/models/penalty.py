"""SAEM's weight-norm penalty (docs/saem.md): ``model.weight_norm_penalty``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["weight_norm_penalty"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def weight_norm_penalty(module: nn.Module) -> Tensor:
    """``sum ||W||_F`` over the ``weight`` of every Linear / Conv / Embedding submodule of
    ``module`` (Frobenius NORMS, not their squares; biases, LayerNorm and BatchNorm parameters
    are excluded). SAEM adds 0.01 x this sum over its image encoder to the loss.

    Returns a scalar tensor (0 for a module without such weights) in the weights' dtype.
    """
    norms = [
        torch.linalg.vector_norm(m.weight)
        for m in module.modules()
        if isinstance(m, _WEIGHTED) and m.weight is not None
    ]
    if not norms:
        p = next(module.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(norms).sum()
