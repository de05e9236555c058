"""Word tokenisation and the SCAN-format vocabulary used by the BiGRU text encoder.

The vocabulary maps lower-cased word tokens to contiguous integer ids with four reserved ids:
``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3. It reads and writes the public SCAN
``*_vocab.json`` format ``{"word2idx": {word: id}, "idx2word": {"id": word}, "idx": N}`` as is.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from itm.data.treebank import treebank_tokenize
from itm.io import atomic_write

__all__ = [
    "END",
    "END_ID",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "START",
    "START_ID",
    "UNK",
    "UNK_ID",
    "Vocabulary",
    "tokenize",
]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS: tuple[str, ...] = (PAD, START, END, UNK)


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lower-cased word tokens, as the authors' ``nltk.word_tokenize(
    caption.lower())`` did (Penn Treebank rules, :mod:`itm.data.treebank`).

    Words keep their hyphens and inner periods (``t-shirt``, ``3.5``, ``3,000``); clitics are
    split off (``don't`` -> ``do`` ``n't``, ``dog's`` -> ``dog`` ``'s``); the final period,
    commas, ``! ? ; & $ %``, brackets and quotes are tokens of their own, so ``"A dog, running."``
    gives ``["a", "dog", ",", "running", "."]``. Whitespace is dropped.

    Args:
        text: a caption.

    Returns:
        The tokens in order (empty for an empty or all-whitespace string).
    """
    return treebank_tokenize(text.lower())


class Vocabulary:
    """Word <-> id mapping with the SCAN special ids (``<pad>`` 0, ``<start>`` 1, ``<end>`` 2,
    ``<unk>`` 3) and contiguous ids ``0 .. len(self) - 1``.

    Attributes:
        word2idx: word -> id.
        idx2word: id -> word (integer keys in memory; strings only in the JSON file).
    """

    def __init__(self, words: Iterable[str] = ()) -> None:
        """Create a vocabulary holding the four special tokens, then ``words`` in order.

        Args:
            words: extra words; duplicates and special tokens are skipped.
        """
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        for word in SPECIAL_TOKENS:
            self.add_word(word)
        for word in words:
            self.add_word(word)

    def add_word(self, word: str) -> int:
        """Add ``word`` if new and return its id."""
        idx = self.word2idx.get(word)
        if idx is None:
            idx = len(self.word2idx)
            self.word2idx[word] = idx
            self.idx2word[idx] = word
        return idx

    def __len__(self) -> int:
        """Number of ids (the embedding table size), special tokens included."""
        return len(self.word2idx)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __call__(self, word: str) -> int:
        """Id of ``word``; ``<unk>`` (3) for a word not in the vocabulary."""
        return self.word2idx.get(word, UNK_ID)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.word2idx == other.word2idx

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)})"

    def encode(self, caption: str) -> list[int]:
        """Token ids of ``caption``: ``[<start>] + ids of tokenize(caption) + [<end>]``.

        Args:
            caption: raw caption text.

        Returns:
            ``len(tokenize(caption)) + 2`` ids (the length counts ``<start>`` and ``<end>``).
        """
        return [START_ID, *(self(tok) for tok in tokenize(caption)), END_ID]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Words of ``ids`` joined by single spaces.

        Args:
            ids: token ids (a list, a 1-D tensor or array of ints).
            skip_special: drop ``<pad>``, ``<start>`` and ``<end>`` (``<unk>`` is kept).

        Returns:
            The decoded text; ids outside the vocabulary decode to ``<unk>``.
        """
        skip = {PAD_ID, START_ID, END_ID} if skip_special else set()
        words = [self.idx2word.get(int(i), UNK) for i in ids if int(i) not in skip]
        return " ".join(words)

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> Vocabulary:
        """Build a vocabulary from raw captions.

        Words occurring at least ``threshold`` times (after :func:`tokenize`) get ids ``4 ..``
        in alphabetical order, so the result does not depend on the order of ``captions``.

        Args:
            captions: raw caption strings.
            threshold: minimum count for a word to be kept (SCAN uses 4 on train + dev).

        Returns:
            The vocabulary.
        """
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        return cls(sorted(w for w, c in counts.items() if c >= threshold))

    def to_dict(self) -> dict[str, object]:
        """The SCAN JSON structure (``idx2word`` keys as strings, as JSON requires)."""
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for i, w in sorted(self.idx2word.items())},
            "idx": len(self),
        }

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the vocabulary in SCAN format, atomically (:func:`itm.io.atomic_write`).

        Args:
            path: destination file.
        """
        with atomic_write(Path(path), "w") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Load a SCAN-format vocabulary JSON as it is.

        ``idx2word`` may have string keys (as every JSON file does) and may be absent (it is then
        derived from ``word2idx``); ``idx`` is informational. Ids must be contiguous from 0 and the
        four special tokens must hold their standard ids.

        Args:
            path: the ``*_vocab.json`` file.

        Returns:
            The vocabulary.

        Raises:
            ValueError: naming ``path`` and the problem, if the file is missing, unreadable, not
                JSON, or not a consistent SCAN vocabulary.
        """
        path = Path(path)

        def fail(problem: str) -> ValueError:
            return ValueError(f"vocabulary file {str(path)!r}: {problem}")

        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise fail("file not found") from None
        except json.JSONDecodeError as e:
            raise fail(f"not valid JSON ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise fail(f"cannot be read ({e})") from None

        if not isinstance(data, dict) or not isinstance(data.get("word2idx"), dict):
            raise fail('expected a JSON object with a "word2idx" object (SCAN vocabulary format)')
        raw_w2i: dict[object, object] = data["word2idx"]
        if not raw_w2i:
            raise fail('"word2idx" is empty')
        word2idx: dict[str, int] = {}
        for word, idx in raw_w2i.items():
            if not isinstance(idx, int) or isinstance(idx, bool):
                raise fail(f'"word2idx"[{word!r}] is {idx!r}, expected an integer id')
            word2idx[str(word)] = idx
        ids = sorted(word2idx.values())
        if ids[-1] >= len(ids) or ids[0] < 0:
            bad = ids[-1] if ids[-1] >= len(ids) else ids[0]
            word = next(w for w, i in word2idx.items() if i == bad)
            raise fail(
                f"token id {bad} (word {word!r}) is past the vocabulary size {len(ids)}: "
                f'"word2idx" ids must be contiguous 0..{len(ids) - 1} (an embedding table of '
                f"{len(ids)} rows)"
            )
        if ids != list(range(len(ids))):
            raise fail(
                f'"word2idx" ids must be unique and contiguous from 0 (got {len(ids)} '
                f"words with ids {ids[0]}..{ids[-1]})"
            )
        for sid, tok in enumerate(SPECIAL_TOKENS):
            if word2idx.get(tok) != sid:
                raise fail(f"special token {tok!r} must have id {sid}, got {word2idx.get(tok)!r}")

        raw_i2w = data.get("idx2word")
        if raw_i2w is not None:
            if not isinstance(raw_i2w, dict):
                raise fail('"idx2word" must be an object mapping ids to words')
            for key, word in raw_i2w.items():
                try:
                    idx = int(key)
                except (TypeError, ValueError):
                    raise fail(f'"idx2word" key {key!r} is not an integer') from None
                if word2idx.get(str(word)) != idx:
                    raise fail(f'"idx2word"[{key!r}] = {word!r} disagrees with "word2idx"')
            if len(raw_i2w) != len(word2idx):
                raise fail(f'"idx2word" has {len(raw_i2w)} entries, "word2idx" {len(word2idx)}')

        vocab = cls.__new__(cls)
        vocab.word2idx = dict(sorted(word2idx.items(), key=lambda kv: kv[1]))
        vocab.idx2word = {i: w for w, i in vocab.word2idx.items()}
        return vocab
