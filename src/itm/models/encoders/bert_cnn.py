"""SAEM's caption encoder (Wu et al., ACM MM 2019), docs/saem.md:
``model/text_encoder=bert_cnn``.

A (frozen) BERT reads each caption padded to EXACTLY ``max_words`` positions; convolutions of
widths 1, 2, 3 over BERT's last layer (each a Conv2d spanning the whole hidden size, i.e. an
n-gram filter), ReLU, a max over ALL positions (the [PAD] positions' states included, as the
authors' code: masking them, or padding only to the batch's longest caption, changes the
result), then Dropout and a Linear map into the joint space. One vector per caption.

``transformers`` is imported when an encoder is built (see :mod:`itm.models.encoders.bert`).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.models.encoders.bert import load_local_bert, read_bert_vocab, wordpiece_tokenizer
from itm.models.functional import l2n, lengths_to_mask

__all__ = ["BertCNNTextEncoder"]


class BertCNNTextEncoder(nn.Module):
    """``bert_cnn``: BERT over ``max_words`` positions -> n-gram CNN -> max -> Linear -> l2n.

    ``forward(tokens [B, L] int64, lengths [B]) -> (emb [B, 1, embed_size], ones [B])``: ONE
    vector per caption, returned with its length 1 (every head and pooling then sees a set of
    one item). ``tokens`` are BERT ids with ``[CLS]`` / ``[SEP]`` (the data's BERT tokenizer
    writes them); slots past a length may hold anything. Each caption is laid out on exactly
    ``max_words`` positions: padded with the pad id (attention mask 0, token type 0), or, when
    longer, cut to its first ``max_words - 1`` tokens followed by ``[SEP]``.

    BERT stays in train mode during training (its dropout is active, as in the authors' code)
    even when frozen; a frozen BERT runs without autograd.

    Parameters: ``bert`` (Hugging Face ``BertModel`` without pooler), ``convs.{i}``
    Conv2d(1, channels, (kernel_sizes[i], hidden)), ``fc`` Linear(len(kernel_sizes) x channels,
    embed_size).

    Args:
        path: a local BERT directory (``config.json``, weights, ``vocab.txt``), as for ``bert``.
        embed_size: joint embedding size d (SAEM: 256).
        max_words: positions BERT reads per caption (32).
        kernel_sizes: convolution widths (1, 2, 3).
        channels: output channels per convolution (512).
        dropout: dropout on the concatenated features (0.1; training only).
        freeze: BERT's parameters are not trained (the authors' recipe).
        norm: l2-normalise the output.

    Raises:
        FileNotFoundError / ValueError: naming ``path`` (see
            :func:`~itm.models.encoders.bert.load_local_bert`), or when ``max_words`` exceeds
            BERT's positions or a kernel is wider than ``max_words``.
    """

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset({"path", "dropout"})

    #: the data's caption tokenizer (:mod:`itm.models.encoders.tokenizer`)
    caption_tokenizer = staticmethod(wordpiece_tokenizer)

    def __init__(
        self,
        path: str,
        embed_size: int = 256,
        max_words: int = 32,
        kernel_sizes: tuple[int, ...] | list[int] = (1, 2, 3),
        channels: int = 512,
        dropout: float = 0.1,
        freeze: bool = True,
        norm: bool = True,
    ) -> None:
        super().__init__()
        path = str(path)
        self.bert = load_local_bert(path)
        config = self.bert.config
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        if not 1 <= max_words <= config.max_position_embeddings:
            raise ValueError(
                f"max_words must lie in 1..{config.max_position_embeddings} (the positions of "
                f"the BERT in {path!r}), got {max_words}"
            )
        if (
            not self.kernel_sizes
            or min(self.kernel_sizes) < 1
            or max(self.kernel_sizes) > max_words
        ):
            raise ValueError(
                f"kernel_sizes must lie in 1..max_words={max_words}, got {kernel_sizes}"
            )
        self.path, self.embed_size, self.max_words = path, embed_size, int(max_words)
        self.freeze, self.norm = bool(freeze), bool(norm)
        self.pad_id = int(config.pad_token_id or 0)
        self.sep_id = self._sep_id(Path(path).expanduser(), config)
        if self.freeze:
            self.bert.requires_grad_(False)
        hidden = config.hidden_size
        self.convs = nn.ModuleList(nn.Conv2d(1, channels, (k, hidden)) for k in self.kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(len(self.kernel_sizes) * channels, embed_size)

    @staticmethod
    def _sep_id(directory: Path, config) -> int | None:
        """The id of ``[SEP]`` from ``vocab.txt`` (else the config's ``sep_token_id``)."""
        if (directory / "vocab.txt").is_file():
            tokens, _ = read_bert_vocab(directory)
            if "[SEP]" in tokens:
                return tokens.index("[SEP]")
        sep = getattr(config, "sep_token_id", None)
        return None if sep is None else int(sep)

    def layout(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens [B, L]`` -> (``ids [B, max_words]``, ``attention_mask [B, max_words]``):
        padded with the pad id, or cut to ``max_words - 1`` tokens + ``[SEP]``."""
        w = self.max_words
        lengths = lengths.to(tokens.device)
        tokens = tokens.masked_fill(
            ~lengths_to_mask(lengths.to(tokens.device), tokens.shape[1]), self.pad_id
        )
        if tokens.shape[1] < w:
            tokens = F.pad(tokens, (0, w - tokens.shape[1]), value=self.pad_id)
        tokens = tokens[:, :w].clone()
        cut = lengths > w
        if bool(cut.any()):
            if self.sep_id is None:
                raise ValueError(
                    f"a caption has more than max_words={w} tokens and the BERT in "
                    f"{self.path!r} names no [SEP] token (vocab.txt) to end the cut caption"
                )
            tokens[cut, w - 1] = self.sep_id
        mask = lengths_to_mask(lengths.clamp_max(w).to(tokens.device), w)
        return tokens, mask

    def bert_states(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """BERT's last layer at every one of the ``max_words`` positions: ``[B, max_words, H]``."""
        ids, mask = self.layout(tokens, lengths)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            return self.bert(
                input_ids=ids, attention_mask=mask.long(), token_type_ids=torch.zeros_like(ids)
            ).last_hidden_state

    def conv_features(self, states: Tensor) -> Tensor:
        """``states [B, W, H]`` -> the max-pooled n-gram features ``[B, len(kernels) x channels]``
        (max over all ``W - k + 1`` positions of each convolution, after ReLU)."""
        x = states.unsqueeze(1)  # [B, 1, W, H]
        return torch.cat([F.relu(conv(x)).squeeze(3).amax(dim=2) for conv in self.convs], dim=1)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        x = self.fc(self.dropout(self.conv_features(self.bert_states(tokens, lengths))))
        x = l2n(x) if self.norm else x
        return x.unsqueeze(1), torch.ones_like(lengths)
