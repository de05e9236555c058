"""Caption encoders (docs/foundations.md, "Feature encoders")."""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itm.models.encoders.augment import augment_words
from itm.models.functional import l2n

__all__ = ["BiGRUTextEncoder"]

log = logging.getLogger(__name__)

PAD_ID, UNK_ID = 0, 3  # the SCAN vocabulary's <pad> and <unk> (itm.data.vocab)


class BiGRUTextEncoder(nn.Module):
    """``bigru``: word embedding -> GRU run PACKED with the true lengths -> directions averaged.

    ``forward(tokens [B, L] int64, lengths [B]) -> [B, L, embed_size]``. The backward direction
    starts at each caption's own last token (packing); outputs past a caption's length are 0.

    Size augmentation (``word_aug > 0``, training mode only): each word except ``<start>`` and
    ``<end>`` is, with probability ``word_aug``, masked (50%), replaced by a random word (10%)
    or deleted (40%) before embedding (:func:`~itm.models.encoders.augment.augment_words`), and
    the result is ``(emb [B, L', embed_size], new_lengths [B])``. The SCAN vocabulary has no
    mask token, so "mask" writes ``<unk>`` (id 3); random words are drawn from ids
    ``4 .. vocab_size - 1`` (never a special token).

    Args:
        vocab_size: vocabulary size (set from the data's vocabulary).
        word_dim: word embedding size (300).
        embed_size: joint embedding size d (the GRU's hidden size).
        num_layers: GRU layers.
        bidirectional: run both directions and average them per step ((h_fwd + h_bwd) / 2).
        norm: l2-normalise each word embedding.
        word_aug: probability of augmenting each word in training (0.2 in the CHAN /
            VSE-infinity recipes; 0 = off).
        glove_path: a local GloVe text file: the rows of the words it holds (looked up as in
            :func:`~itm.models.encoders.glove.read_glove`) start from their GloVe vectors, the
            other rows from N(0, 1), as CHAN's ``--wemb_type=glove`` (its attempt to freeze
            the table sets an attribute of the module, not of the weight, so the embedding
            trains). Read once, when the model is built for training; evaluation rebuilds the
            model from its checkpoint without reading it. Needs ``vocab_path``.
        vocab_path: the SCAN ``*_vocab.json`` whose ids index the table (with ``glove_path``).
        dropout: Dropout on the word embeddings, training only (SGRAF's recipes: 0.4; the
            other recipes 0).

    Raises:
        ValueError: ``glove_path`` without ``vocab_path``, a vocabulary larger than
            ``vocab_size``, or a GloVe file of another dimension than ``word_dim``.
    """

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset(
        {"word_aug", "dropout", "glove_path", "vocab_path"}
    )

    #: id written for a masked word (the SCAN vocabulary's ``<unk>``).
    mask_id: int = UNK_ID
    #: random replacement ids start here (after ``<pad>``, ``<start>``, ``<end>``, ``<unk>``).
    n_special: int = UNK_ID + 1

    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        embed_size: int = 1024,
        num_layers: int = 1,
        bidirectional: bool = True,
        norm: bool = True,
        word_aug: float = 0.0,
        glove_path: str | None = None,
        vocab_path: str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= word_aug <= 1.0:
            raise ValueError(f"word_aug must lie in [0, 1], got {word_aug}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.text_encoder.dropout must lie in [0, 1), got {dropout}")
        self.dropout = nn.Dropout(float(dropout))
        self.embed_size, self.bidirectional, self.norm = embed_size, bidirectional, norm
        self.vocab_size, self.word_aug = vocab_size, float(word_aug)
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.rnn = nn.GRU(
            word_dim, embed_size, num_layers, batch_first=True, bidirectional=bidirectional
        )
        if glove_path:
            self.init_from_glove(glove_path, vocab_path)

    @torch.no_grad()
    def init_from_glove(self, glove_path: str, vocab_path: str | None) -> list[str]:
        """Initialise the word table from a GloVe file (see ``glove_path``); returns the
        vocabulary words GloVe does not hold."""
        from itm.data.vocab import Vocabulary
        from itm.models.encoders.glove import read_glove

        if not vocab_path:
            raise ValueError(
                "model.text_encoder.glove_path needs model.text_encoder.vocab_path (the "
                "*_vocab.json whose ids the word table uses)"
            )
        vocab = Vocabulary.from_json(vocab_path)
        if len(vocab) > self.vocab_size:
            raise ValueError(
                f"vocabulary {vocab_path} holds {len(vocab)} words, the word table "
                f"{self.vocab_size} rows (model.text_encoder.vocab_size)"
            )
        rows, vectors, missing = read_glove(glove_path, vocab.word2idx, self.embed.embedding_dim)
        nn.init.normal_(self.embed.weight)
        self.embed.weight[rows] = vectors
        log.info(
            "word table: %d of %d vocabulary words from %s (%d missing)",
            len(rows),
            len(vocab),
            glove_path,
            len(missing),
        )
        return missing

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        # Slots past a caption's length may hold anything: replace them by <pad> before lookup.
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        valid = pos[None, :] < lengths.to(tokens.device)[:, None]
        tokens = tokens.masked_fill(~valid, PAD_ID)
        if int(tokens.max()) >= self.embed.num_embeddings or int(tokens.min()) < 0:
            raise ValueError(
                f"token ids must lie in 0..{self.embed.num_embeddings - 1} (the vocabulary), "
                f"got min {int(tokens.min())}, max {int(tokens.max())}"
            )
        augment = self.training and self.word_aug > 0
        if augment:
            tokens, lengths = augment_words(
                tokens, lengths, self.word_aug, self.mask_id, self.vocab_size, self.n_special
            )
        total = tokens.shape[1]
        x = self.dropout(self.embed(tokens))
        packed = pack_padded_sequence(
            x, lengths.detach().to("cpu", torch.int64), batch_first=True, enforce_sorted=False
        )
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=total)
        if self.bidirectional:
            out = (out[..., : self.embed_size] + out[..., self.embed_size :]) / 2
        out = l2n(out) if self.norm else out
        return (out, lengths) if augment else out
