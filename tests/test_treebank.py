"""The caption tokenizer against nltk's Treebank word tokenizer (what the authors' vocabularies
were built with): a golden list over varied punctuation, the released cases' own token lists,
and, where nltk is installed, nltk itself on generated captions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from itm.data.treebank import treebank_tokenize
from itm.data.vocab import Vocabulary, tokenize

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = json.loads((DATA / "treebank_golden.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", GOLDEN, ids=[c["caption"][:40] for c in GOLDEN])
def test_golden_tokens(case):
    """nltk 3.10.4 ``word_tokenize(caption.lower())``: quotes, hyphens, possessives, clitics,
    "...", "&", "$", "%", numbers with "," ":" ".", brackets, "--", final . ! ?"""
    assert tokenize(case["caption"]) == case["tokens"]


def test_golden_list_covers_the_punctuation_classes():
    text = " ".join(c["caption"] for c in GOLDEN)
    for needle in ('"', "'s", "n't", "...", "&", "-", ",", "!", "?", ";", ":", "$", "%", "(", "--"):
        assert needle in text, needle
    assert any(not c["same_as_treebank"] for c in GOLDEN)  # the improved rules are exercised


def test_released_cases_tokens_and_ids():
    """The token lists and ids the authors' data loaders produced for the 30 test captions."""
    released = DATA / "released"
    captions = (released / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    vocab = Vocabulary.from_json(released / "f30k_precomp_vocab.json")
    with np.load(released / "scan_t2i_lse" / "expected.npz") as e:
        tokens, ids, lens = json.loads(str(e["tokens_json"])), e["cap_token_ids"], e["cap_lens"]
    assert [tokenize(c) for c in captions] == tokens
    for i, caption in enumerate(captions):
        assert vocab.encode(caption) == ids[i, : lens[i]].tolist()


def test_case_is_kept_and_whitespace_dropped():
    assert treebank_tokenize("A Dog's TOY") == ["A", "Dog", "'s", "TOY"]
    assert treebank_tokenize("  \t ") == []
    assert tokenize("") == []


WORDS = [
    "a",
    "dog",
    "man's",
    "isn't",
    "can't",
    "cannot",
    "gonna",
    "t-shirt",
    "3.5",
    "3,000",
    "10:30",
    "$5",
    "50%",
    "&",
    "...",
    "..",
    ".",
    ",",
    "!",
    "?",
    ";",
    ":",
    "'",
    '"',
    "``",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "<",
    ">",
    "--",
    "-",
    "/",
    "a/b",
    "o'clock",
    "dogs'",
    "'hello",
    "they'll",
    "we're",
    "i'm",
    "st.",
    "u.s.",
    "#1",
    "@home",
    "*",
    "don't",
    "'tis",
    "d'ye",
    "more'n",
    "“quoted”",
    "‘single’",
    "«x»",
    "–",
    "—",
    "end.",
    "x'",
    "''a",
    "4x4",
    "(a)",
    "'90s",
]


def test_against_nltk_where_installed():
    """nltk's own tokenizer on 3000 generated strings mixing every rule's trigger."""
    nltk_tokenize = pytest.importorskip("nltk.tokenize").word_tokenize
    rng = random.Random(0)
    for _ in range(3000):
        text = rng.choice(["", " ", "  "]).join(
            rng.choice(WORDS) for _ in range(rng.randint(1, 12))
        )
        text += rng.choice(["", ".", "!", "?", " .", "...", '."', ".'"])
        assert tokenize(text) == nltk_tokenize(text.lower(), preserve_line=True), text
