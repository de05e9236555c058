"""Word vectors from a local GloVe text file, to initialise a BiGRU's word embedding.

CHAN (``--wemb_type=glove``) and VSE-infinity's BiGRU recipes start the embedding table from
GloVe vectors (Pennington et al., 2014) instead of random values. The authors read them through
torchtext's downloader; here the file must be on disk (nothing is downloaded): the plain GloVe
text format, one word per line followed by its ``dim`` numbers separated by single spaces
(``glove.840B.300d.txt`` and the like; a word that itself holds spaces is read correctly).

Word lookup follows CHAN's: a vocabulary word is looked up as it is; when absent, it is looked up
again with ``-``, ``.`` and ``'`` removed and, if it holds a ``/``, only the part before the
first ``/`` (``t-shirt`` -> ``tshirt``, ``hi/fi`` -> ``hi``). A word found in neither form keeps
its initial (random) row. The first line of the file that holds a word wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["glove_fallback", "read_glove", "without_word_vectors"]


def glove_fallback(word: str) -> str:
    """The second form a vocabulary word is looked up in (CHAN's "word-hit" trick)."""
    word = word.replace("-", "").replace(".", "").replace("'", "")
    return word.split("/")[0] if "/" in word else word


def read_glove(
    path: str | Path, word2idx: Mapping[str, int], dim: int
) -> tuple[Tensor, Tensor, list[str]]:
    """The GloVe vectors of the vocabulary's words.

    Only lines whose word is wanted are parsed, so a multi-gigabyte file costs one pass of
    reading.

    Args:
        path: the GloVe text file.
        word2idx: vocabulary word -> embedding row.
        dim: the embedding size (must equal the file's vector size).

    Returns:
        ``(rows [n] int64, vectors [n, dim] float32, missing words)``: the rows found and their
        vectors, and the vocabulary words found in neither form.

    Raises:
        FileNotFoundError: naming ``path`` when it does not exist.
        ValueError: naming ``path`` and the line when a vector of a wanted word does not have
            ``dim`` numbers, or when no vocabulary word is found at all (wrong file?).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file {str(path)!r} does not exist")
    # each wanted form -> the rows that look it up in that form (exact forms first)
    exact: dict[str, list[int]] = {}
    second: dict[str, list[int]] = {}
    for word, idx in word2idx.items():
        exact.setdefault(word, []).append(int(idx))
    for word, idx in word2idx.items():
        alt = glove_fallback(word)
        if alt != word:
            second.setdefault(alt, []).append(int(idx))
    found_exact: dict[str, list[float]] = {}
    found_second: dict[str, list[float]] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if lineno == 1 and len(line.split()) - 1 != dim:
                raise ValueError(
                    f"GloVe file {str(path)!r}: its first vector has {len(line.split()) - 1} "
                    f"numbers, the embedding {dim} (model.text_encoder.word_dim)"
                )
            head = line.split(" ", 1)[0]
            if head not in exact and head not in second:
                continue
            fields = line.rstrip().split(" ")
            if len(fields) <= dim:
                raise ValueError(
                    f"GloVe file {str(path)!r} line {lineno}: {len(fields) - 1} numbers after "
                    f"the word, expected {dim} (model.text_encoder.word_dim)"
                )
            word = " ".join(fields[:-dim])
            try:
                vector = [float(x) for x in fields[-dim:]]
            except ValueError as e:
                raise ValueError(f"GloVe file {str(path)!r} line {lineno}: {e}") from None
            if word in exact and word not in found_exact:
                found_exact[word] = vector
            if word in second and word not in found_second:
                found_second[word] = vector
    rows: list[int] = []
    vectors: list[list[float]] = []
    missing: list[str] = []
    for word, idx in word2idx.items():
        vector = found_exact.get(word)
        if vector is None:
            vector = found_second.get(glove_fallback(word))
        if vector is None:
            missing.append(word)
            continue
        rows.append(int(idx))
        vectors.append(vector)
    if not rows:
        raise ValueError(
            f"GloVe file {str(path)!r} holds none of the {len(word2idx)} vocabulary words "
            f"(is it a GloVe text file of dimension {dim}?)"
        )
    return (
        torch.tensor(rows, dtype=torch.int64),
        torch.tensor(vectors, dtype=torch.float32).reshape(len(rows), dim),
        missing,
    )


def without_word_vectors(model_cfg: Mapping) -> dict:
    """A copy of a model config whose text encoder reads no GloVe file when built: for
    rebuilding a trained model whose weights come from a checkpoint anyway."""
    cfg = dict(model_cfg)
    text = cfg.get("text_encoder")
    if isinstance(text, Mapping) and text.get("glove_path"):
        cfg["text_encoder"] = {**text, "glove_path": None}
    return cfg
