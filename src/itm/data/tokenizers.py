"""Caption tokenizers other than the SCAN word vocabulary (a local BERT WordPiece tokenizer).

A caption tokenizer needs what the data pipeline uses of :class:`~itm.data.vocab.Vocabulary`:
``encode(caption) -> list[int]`` (the ids, end tokens included), ``len()`` (the vocabulary size)
and pad id 0 (the collate functions pad with 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["BertCaptionTokenizer"]

# tokenizer_config.json keys passed on to the WordPiece tokenizer built from vocab.txt.
_CONFIG_KEYS = (
    "do_lower_case",
    "strip_accents",
    "tokenize_chinese_chars",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class BertCaptionTokenizer:
    """The WordPiece tokenizer of a local BERT directory, with the Vocabulary interface.

    The tokenizer is built from ``<path>/vocab.txt`` with the settings of
    ``<path>/tokenizer_config.json`` (lower-casing, accents, special tokens; BERT-uncased
    defaults when absent). It deliberately ignores a ``tokenizer.json``: a directory written by
    ``BertTokenizer(vocab_file=...).save_pretrained`` under transformers 5 holds one that maps
    every word to ``[UNK]``, while ``vocab.txt`` is always the ground truth. Nothing is
    downloaded.

    Picklable (DataLoader workers, ``ddp_spawn``): only the path and options travel; the
    tokenizer is rebuilt lazily after unpickling.

    Args:
        path: the BERT directory (the one the text encoder loads).
        max_length: truncate encoded captions to this many ids (``[SEP]`` kept); ``None``
            keeps them whole (captions are far below BERT's 512 positions).

    Raises:
        FileNotFoundError: naming the path, if the directory or its ``vocab.txt`` is missing.
        ValueError: naming the path, if the pad token's id is not 0 (the data pipeline pads
            with 0) or the vocabulary is unusable.
    """

    def __init__(self, path: str | Path, max_length: int | None = None) -> None:
        self.path = str(path)
        self.max_length = max_length
        self._tokenizer: Any = None
        self._load()  # fail early, in the main process, with a clear error

    # --- construction / pickling -------------------------------------------------------------

    def _load(self) -> Any:
        if self._tokenizer is not None:
            return self._tokenizer
        directory = Path(self.path).expanduser()
        if not directory.is_dir():
            hint = " (set model.text_encoder.path)" if self.path in ("", "???") else ""
            raise FileNotFoundError(f"BERT tokenizer directory {self.path!r} does not exist{hint}")
        vocab_file = directory / "vocab.txt"
        if not vocab_file.is_file():
            raise FileNotFoundError(f"BERT tokenizer directory {self.path!r} has no vocab.txt")
        kwargs: dict[str, Any] = {}
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(config_file)!r} is not valid JSON ({e})") from None
            for key in _CONFIG_KEYS:
                value = config.get(key)
                if isinstance(value, dict):  # AddedToken saved as {"content": ..., ...}
                    value = value.get("content")
                if value is not None or key == "strip_accents":
                    kwargs[key] = value
        # Captions are encoded one at a time (no batch parallelism to gain); the Rust thread
        # pool of `tokenizers` makes forked DataLoader workers linger ~5 s at shutdown.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import BertTokenizer

        # BertTokenizer(vocab=<file>) reads the WordPiece vocabulary; vocab_file= would be
        # silently ignored by the transformers 5 fast backend (every word -> [UNK]).
        tokenizer = BertTokenizer(vocab=str(vocab_file), **kwargs)
        n_lines = len(vocab_file.read_text(encoding="utf-8").splitlines())
        if len(tokenizer) < n_lines:
            raise ValueError(
                f"BERT tokenizer of {self.path!r}: read {len(tokenizer)} tokens from vocab.txt "
                f"of {n_lines} lines"
            )
        model_config = directory / "config.json"
        if model_config.is_file():
            try:
                n_embed = json.loads(model_config.read_text(encoding="utf-8")).get("vocab_size")
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(model_config)!r} is not valid JSON ({e})") from None
            if isinstance(n_embed, int) and len(tokenizer) > n_embed:
                raise ValueError(
                    f"{str(vocab_file)!r}: {len(tokenizer)} tokens, but the model's "
                    f"{str(model_config)!r} has vocab_size {n_embed}: token ids "
                    f"{n_embed}..{len(tokenizer) - 1} would be past the embedding table "
                    f"(the vocab.txt does not belong to this model)"
                )
        if tokenizer.pad_token_id != 0:
            raise ValueError(
                f"BERT tokenizer of {self.path!r}: pad token {tokenizer.pad_token!r} has id "
                f"{tokenizer.pad_token_id}, but the data pipeline pads with 0"
            )
        self._tokenizer = tokenizer
        return tokenizer

    @property
    def tokenizer(self) -> Any:
        """The underlying ``transformers.BertTokenizer`` (built on first use)."""
        return self._load()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # --- the Vocabulary interface ------------------------------------------------------------

    def encode(self, caption: str) -> list[int]:
        """Ids of ``caption``: ``[CLS]`` + WordPiece ids (lower-cased per the config) + ``[SEP]``."""
        if self.max_length is None:
            return list(self.tokenizer.encode(caption, add_special_tokens=True))
        return list(
            self.tokenizer.encode(
                caption, add_special_tokens=True, truncation=True, max_length=self.max_length
            )
        )

    def decode(self, ids: Any, skip_special: bool = True) -> str:
        """Text of ``ids`` (WordPiece pieces merged back into words)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def __len__(self) -> int:
        """Vocabulary size (the embedding table size)."""
        return len(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return len(self)

    @property
    def pad_id(self) -> int:
        """Id of ``[PAD]``; always 0 (checked at load)."""
        return int(self.tokenizer.pad_token_id)

    @property
    def mask_id(self) -> int:
        """Id of ``[MASK]``."""
        return int(self.tokenizer.mask_token_id)

    @property
    def unk_id(self) -> int:
        """Id of ``[UNK]``."""
        return int(self.tokenizer.unk_token_id)

    def __repr__(self) -> str:
        return f"BertCaptionTokenizer(path={self.path!r})"
