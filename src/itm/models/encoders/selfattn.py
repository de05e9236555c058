"""CHAN's self-attention region encoder (Pan et al., CVPR 2023; ``--precomp_enc_type=selfattention``).

The released CHAN BiGRU recipe embeds the regions with one Linear, then lets them attend to each
other once, pre-norm and residual::

    x = fc(v)                         # [B, K, d]
    y = LayerNorm(x)
    x = x + MultiheadAttention(y, y, y)   # 8 heads, batch_first, dropout 0
    x = l2n(x)                        # per region, unless norm is false

Padding. The authors call the attention without a key-padding mask (their images all hold 36
regions at evaluation). This encoder masks the padded regions as keys, so an image's result never
depends on the padding its batch happens to need. When every image of the batch holds all K
slots (the public 36-region data at evaluation) it passes no mask at all, which is the authors'
exact computation; with padding present the masked attention is the correct reading of theirs.
(In training with region dropping, the authors' padded slots, zero features mapped to ``fc``'s
bias, took part in the attention as keys; here they do not.) Outputs at padded slots are finite
and never read by the heads.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from itm.models.encoders.image import FCImageEncoder

__all__ = ["SelfAttentionImageEncoder"]


class SelfAttentionImageEncoder(FCImageEncoder):
    """``selfattn``: ``fc``, then ``x + MultiheadAttention(LN(x))`` over the valid regions, then l2n.

    ``forward(images [B, K, img_dim], lengths [B]) -> [B, K, embed_size]``; with
    ``region_drop > 0`` in training, regions are dropped first and the result is
    ``(emb, new_lengths)`` (as :class:`~itm.models.encoders.image.FCImageEncoder`).

    Parameters (CHAN's names in brackets): ``fc`` Linear(img_dim, d) (``fc``), ``ln``
    LayerNorm(d) (``feedforward.ln``), ``attn`` nn.MultiheadAttention(d, num_heads,
    batch_first=True) (``feedforward.attn``).

    Args:
        img_dim: region feature size (set from the data).
        embed_size: joint embedding size d (a multiple of ``num_heads``).
        num_heads: attention heads (8 in CHAN).
        dropout: attention-weight dropout in training (0 in CHAN).
        norm: l2-normalise each region embedding.
        region_drop: probability of dropping each region in training (0.2 in CHAN's recipe).
    """

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset({"dropout"})

    def __init__(
        self,
        img_dim: int = 2048,
        embed_size: int = 1024,
        num_heads: int = 8,
        dropout: float = 0.0,
        norm: bool = True,
        region_drop: float = 0.0,
    ) -> None:
        super().__init__(img_dim, embed_size, norm, region_drop)
        if embed_size % num_heads:
            raise ValueError(
                f"embed_size ({embed_size}) must be a multiple of num_heads ({num_heads})"
            )
        self.num_heads = int(num_heads)
        self.ln = nn.LayerNorm(embed_size)
        self.attn = nn.MultiheadAttention(
            embed_size, self.num_heads, dropout=float(dropout), batch_first=True
        )

    def embed(self, images: Tensor, lengths: Tensor) -> Tensor:
        """Un-normalised region embeddings ``[B, K, embed_size]`` (padded regions masked as keys)."""
        x = self.fc(images)
        y = self.ln(x)
        k = images.shape[1]
        lengths = lengths.to(images.device)
        padded = None
        if bool((lengths < k).any()):
            padded = torch.arange(k, device=images.device)[None, :] >= lengths[:, None]
        out, _ = self.attn(y, y, y, key_padding_mask=padded, need_weights=False)
        return x + out
