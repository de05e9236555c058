"""SAEM's region self-attention encoder (Wu et al., "Learning Fragment Self-Attention
Embeddings for Image-Text Matching", ACM MM 2019), docs/saem.md:
``model/image_encoder=transformer``.

Each region is mapped by a Linear layer into the joint space, then ONE post-LN BERT layer lets
every region attend to the valid regions of its image. The sub-module names follow Hugging
Face's ``BertLayer`` (``layer.attention.self.query`` ...), so the authors' ``TransformerMapping``
weights load one to one (their LayerNorm ``gamma`` / ``beta`` are ``weight`` / ``bias`` here).
The layer is written out here (no transformers import): it is a few lines, and its masking and
dropout are then exactly the ones specified.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from itm.models.encoders.augment import drop_regions
from itm.models.functional import l2n, lengths_to_mask

__all__ = ["BertLayer", "TransformerImageEncoder"]


class _SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention; ``query`` / ``key`` / ``value`` Linear(d, d)."""

    def __init__(self, d: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        b, k, d = x.shape
        h = self.num_heads

        def heads(t: Tensor) -> Tensor:  # [B, K, d] -> [B, h, K, d / h]
            return t.reshape(b, k, h, d // h).transpose(1, 2)

        # softmax(q k^T / sqrt(d / h)) over the valid keys, dropout on the probabilities
        ctx = F.scaled_dot_product_attention(
            heads(self.query(x)),
            heads(self.key(x)),
            heads(self.value(x)),
            attn_mask=key_mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return ctx.transpose(1, 2).reshape(b, k, d)


class _Residual(nn.Module):
    """``LayerNorm(x + dropout(dense(h)))`` (BERT's ``SelfOutput`` / ``Output``)."""

    def __init__(self, d_in: int, d: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)  # noqa: N815 - the Hugging Face name
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(h)))


class _Attention(nn.Module):
    def __init__(self, d: int, num_heads: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(d, num_heads, dropout)
        self.output = _Residual(d, d, dropout, eps)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        return self.output(self.self(x, key_mask), x)


class _Intermediate(nn.Module):
    def __init__(self, d: int, ffn_dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d, ffn_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # the erf form


class BertLayer(nn.Module):
    """One post-LN transformer layer in Hugging Face's ``BertLayer`` layout.

    ``forward(x [B, K, d], key_mask [B, K]) -> [B, K, d]``: attention over the keys where
    ``key_mask`` is True, ``a = LayerNorm(x + drop(attention.output.dense(attn)))``, then
    ``LayerNorm(a + drop(output.dense(gelu(intermediate.dense(a)))))``. Dropout ``dropout`` on
    the attention probabilities and after both dense outputs (training only); LayerNorm eps
    inside the square root, as ``nn.LayerNorm``.
    """

    def __init__(
        self, d: int, num_heads: int, ffn_dim: int, dropout: float, layer_norm_eps: float
    ) -> None:
        super().__init__()
        if d % num_heads:
            raise ValueError(f"embed_size {d} is not divisible by num_heads {num_heads}")
        self.attention = _Attention(d, num_heads, dropout, layer_norm_eps)
        self.intermediate = _Intermediate(d, ffn_dim)
        self.output = _Residual(ffn_dim, d, dropout, layer_norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        a = self.attention(x, key_mask)
        return self.output(self.intermediate(a), a)


class TransformerImageEncoder(nn.Module):
    """``transformer``: ``fc`` Linear(img_dim, d) (torch's default init) -> :class:`BertLayer`.

    ``forward(images [B, K, img_dim], lengths [B]) -> [B, K, embed_size]``: the layer's states,
    not normalised (``norm: false``, SAEM: ``pooling=avg`` and the ``global`` head then give
    ``l2n(mean over the valid regions)``). Keys are masked to each image's valid regions (the
    authors' code always has 36 valid regions), so padded slots never reach a valid region;
    they are zeroed on input and their outputs are finite and unused. With ``region_drop > 0``
    in training the result is ``(states, new_lengths)``.

    Args:
        img_dim: region feature size (set from the data).
        embed_size: joint embedding size d (SAEM: 256).
        num_heads: attention heads (16).
        ffn_dim: feed-forward size (2048).
        dropout: dropout of the attention probabilities and of both dense outputs (0.1).
        layer_norm_eps: LayerNorm eps (1e-12, BERT's).
        norm: l2-normalise each region state.
        region_drop: probability of dropping each region in training (0 = off).
    """

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset({"dropout", "region_drop"})

    def __init__(
        self,
        img_dim: int = 2048,
        embed_size: int = 256,
        num_heads: int = 16,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        norm: bool = False,
        region_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= region_drop < 1.0:
            raise ValueError(f"region_drop must lie in [0, 1), got {region_drop}")
        self.img_dim, self.embed_size, self.norm = img_dim, embed_size, bool(norm)
        self.region_drop = float(region_drop)
        self.fc = nn.Linear(img_dim, embed_size)
        self.layer = BertLayer(embed_size, num_heads, ffn_dim, dropout, layer_norm_eps)

    def forward(self, images: Tensor, lengths: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        augment = self.training and self.region_drop > 0
        if augment:
            images, lengths = drop_regions(images, lengths, self.region_drop)
        mask = lengths_to_mask(lengths.to(images.device), images.shape[1])
        x = self.layer(self.fc(images.masked_fill(~mask[..., None], 0.0)), mask)
        x = l2n(x) if self.norm else x
        return (x, lengths) if augment else x
