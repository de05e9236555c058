"""BERT caption encoder loaded from a local checkpoint directory (docs/foundations.md, "Feature encoders").

``transformers`` is imported when an encoder is built, not when this module is imported, so
``import itm.models`` stays fast (importing transformers costs ~4 s on the project machines).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from itm.models.encoders.augment import augment_words
from itm.models.functional import l2n

__all__ = ["BertTextEncoder", "load_local_bert", "read_bert_vocab", "wordpiece_tokenizer"]

_BRACKETED = re.compile(r"^\[[^\]]*\]$")  # [PAD], [UNK], [unused42], ...


def wordpiece_tokenizer(config: Mapping[str, Any]) -> Any:
    """The data's caption tokenizer of a BERT-based text encoder built from ``config`` (``bert``,
    ``bert_cnn``): the WordPiece tokenizer of the same BERT directory (``config["path"]``;
    :class:`~itm.data.tokenizers.BertCaptionTokenizer`)."""
    from itm.data.tokenizers import BertCaptionTokenizer

    return BertCaptionTokenizer(str(config["path"]))


def _missing_path_error(path: str) -> FileNotFoundError:
    hint = (
        " (set model.text_encoder.path to a local BERT directory, e.g. bert-base-uncased "
        "saved with save_pretrained)"
        if path in ("", "???")
        else ""
    )
    return FileNotFoundError(f"BERT directory {path!r} does not exist{hint}")


def load_local_bert(path: str) -> Any:
    """A ``BertModel`` (without its pooler) from the local directory ``path``, in train mode;
    nothing is downloaded.

    ``from_pretrained`` returns eval mode, and Lightning keeps a submodule's mode through
    training, so without the switch BERT would fine-tune with its dropout off (the authors train
    with it on); the enclosing module's ``train()`` / ``eval()`` still switch it.

    Raises:
        FileNotFoundError: naming ``path`` when the directory or its ``config.json`` is missing.
        ValueError: naming ``path`` when transformers cannot load a model from it.
    """
    directory = Path(path).expanduser()
    # "" would resolve to the working directory: an unset path, not a directory
    if path.strip() in ("", "???") or not directory.is_dir():
        raise _missing_path_error(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"BERT directory {path!r} has no config.json (expected a BertModel saved with "
            "save_pretrained)"
        )
    from transformers import BertModel

    try:
        bert = BertModel.from_pretrained(
            str(directory), local_files_only=True, add_pooling_layer=False
        )
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a BertModel from {path!r}: {e}") from e
    return bert.train()


def read_bert_vocab(path: str | Path) -> tuple[list[str], str]:
    """The tokens of ``<path>/vocab.txt`` (line i = id i) and the mask token's text.

    The mask token is ``mask_token`` of ``tokenizer_config.json`` when present, else ``[MASK]``.

    Raises:
        FileNotFoundError: naming the file, when ``vocab.txt`` is missing.
    """
    path = Path(path)
    vocab_file = path / "vocab.txt"
    if not vocab_file.is_file():
        raise FileNotFoundError(f"BERT directory {str(path)!r} has no vocab.txt")
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    mask_token: Any = "[MASK]"
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        mask_token = json.loads(config_file.read_text(encoding="utf-8")).get(
            "mask_token", mask_token
        )
        if isinstance(mask_token, dict):  # an AddedToken saved as {"content": "[MASK]", ...}
            mask_token = mask_token.get("content", "[MASK]")
    return tokens, str(mask_token)


class BertTextEncoder(nn.Module):
    """``bert``: a local ``BertModel`` -> last hidden states -> Linear(hidden, d) -> l2n per token.

    ``forward(tokens [B, L] int64, lengths [B]) -> [B, L, embed_size]``. The attention mask is
    ``position < length`` (the same as ``token != [PAD]`` for a padded batch); slots past a
    length are replaced by the pad id before BERT sees them, so they may hold anything. The
    model is built without BERT's pooler (never used; unused parameters would trouble DDP).

    Size augmentation (``word_aug > 0``, training mode only): each token except ``[CLS]`` and
    ``[SEP]`` is, with probability ``word_aug``, replaced by ``[MASK]`` (50%), by a random
    token (10%; drawn from the ids after the leading bracketed special / ``[unusedN]`` tokens
    of ``vocab.txt``) or deleted (40%); the result is then ``(emb [B, L', d], new_lengths)``.

    Args:
        path: a local directory holding a ``BertModel`` saved with ``save_pretrained``
            (``config.json`` + weights) and its ``vocab.txt``. Nothing is downloaded.
        embed_size: joint embedding size d.
        norm: l2-normalise each token embedding (VSE-infinity recipes set it false).
        lr_mult: learning-rate multiplier of the BERT parameters (see :meth:`lr_mult_groups`);
            ``fc`` trains at the base lr.
        word_aug: probability of augmenting each token in training (0 = off).

    Raises:
        FileNotFoundError: naming ``path`` when the directory or its ``config.json`` is missing
            (or ``vocab.txt``, when ``word_aug > 0`` needs the mask id).
        ValueError: naming ``path`` when transformers cannot load a model from it.
    """

    #: options that change training only (:mod:`itm.models.schema`): resume may change them
    training_only_options: ClassVar[frozenset[str]] = frozenset({"path", "lr_mult", "word_aug"})

    #: the data's caption tokenizer (:mod:`itm.models.encoders.tokenizer`)
    caption_tokenizer = staticmethod(wordpiece_tokenizer)

    def __init__(
        self,
        path: str,
        embed_size: int = 1024,
        norm: bool = True,
        lr_mult: float = 0.1,
        word_aug: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= word_aug <= 1.0:
            raise ValueError(f"word_aug must lie in [0, 1], got {word_aug}")
        path = str(path)
        directory = Path(path).expanduser()
        self.bert = load_local_bert(path)
        self.path, self.embed_size, self.norm = path, embed_size, norm
        self.lr_mult, self.word_aug = float(lr_mult), float(word_aug)
        self.pad_id = int(self.bert.config.pad_token_id or 0)
        self.vocab_size = int(self.bert.config.vocab_size)
        # Mask id and the first "ordinary" id come from vocab.txt; without one (a model-only
        # directory) they are unknown, which is fine unless word augmentation needs them.
        self.mask_id: int | None = None
        self.n_special = 0
        if (directory / "vocab.txt").is_file() or word_aug > 0:
            tokens, mask_token = read_bert_vocab(directory)
            if mask_token not in tokens:
                raise ValueError(f"{path!r}: vocab.txt has no mask token {mask_token!r}")
            self.mask_id = tokens.index(mask_token)
            self.vocab_size = min(self.vocab_size, len(tokens))
            self.n_special = next(
                (i for i, t in enumerate(tokens) if not _BRACKETED.match(t)), len(tokens)
            )
            if word_aug > 0 and self.n_special >= self.vocab_size:
                raise ValueError(f"{path!r}: vocab.txt holds no ordinary tokens")
        self.fc = nn.Linear(self.bert.config.hidden_size, embed_size)

    def lr_mult_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """``[(BERT parameters, lr_mult)]``; everything else (``fc``) uses the base lr."""
        return [(list(self.bert.parameters()), self.lr_mult)]

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        augment = self.training and self.word_aug > 0
        if augment:
            assert self.mask_id is not None
            tokens, lengths = augment_words(
                tokens,
                lengths,
                self.word_aug,
                self.mask_id,
                self.vocab_size,
                self.n_special,
                pad_id=self.pad_id,
            )
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        mask = pos[None, :] < lengths.to(tokens.device)[:, None]
        tokens = tokens.masked_fill(~mask, self.pad_id)
        hidden = self.bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        out = self.fc(hidden)
        out = l2n(out) if self.norm else out
        return (out, lengths) if augment else out
