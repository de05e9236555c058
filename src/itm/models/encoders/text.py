"""Caption encoders (methods.md section 1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itm.models.encoders.common import l2norm

__all__ = ["BiGRUTextEncoder", "l2norm"]


class BiGRUTextEncoder(nn.Module):
    """``bigru``: word embedding -> GRU run PACKED with the true lengths -> directions averaged.

    ``forward(tokens [B, L] int64, lengths [B]) -> [B, L, embed_size]``. The backward direction
    starts at each caption's own last token (packing); outputs past a caption's length are 0.

    Args:
        vocab_size: vocabulary size (set from the data's vocabulary).
        word_dim: word embedding size (300).
        embed_size: joint embedding size d (the GRU's hidden size).
        num_layers: GRU layers.
        bidirectional: run both directions and average them per step ((h_fwd + h_bwd) / 2).
        norm: l2-normalise each word embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        embed_size: int = 1024,
        num_layers: int = 1,
        bidirectional: bool = True,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.embed_size, self.bidirectional, self.norm = embed_size, bidirectional, norm
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.rnn = nn.GRU(
            word_dim, embed_size, num_layers, batch_first=True, bidirectional=bidirectional
        )

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        total = tokens.shape[1]
        if int(tokens.max()) >= self.embed.num_embeddings or int(tokens.min()) < 0:
            raise ValueError(
                f"token ids must lie in 0..{self.embed.num_embeddings - 1} (the vocabulary), "
                f"got min {int(tokens.min())}, max {int(tokens.max())}"
            )
        x = self.embed(tokens)
        packed = pack_padded_sequence(
            x, lengths.detach().to("cpu", torch.int64), batch_first=True, enforce_sorted=False
        )
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=total)
        if self.bidirectional:
            out = (out[..., : self.embed_size] + out[..., self.embed_size :]) / 2
        return l2norm(out) if self.norm else out
