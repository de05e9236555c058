"""Penn Treebank word tokenisation, as the authors of SCAN and its successors tokenised captions.

SCAN, IMRAM, CHAN, VSE-infinity and SGRAF build their vocabularies and encode captions with
nltk's ``word_tokenize(caption.lower())``, whose word tokenizer is nltk's improved Treebank
tokenizer (``NLTKWordTokenizer``; the older ``TreebankWordTokenizer`` of the authors' nltk era
differs from it only on characters captions hardly hold: curly / guillemet quotes, runs of four
or more dots, unicode dashes, ``*``, and a quote opening a word, e.g. ``'hello``). This module
applies the same rewriting rules in the same order, so a caption gives the same tokens without
nltk installed:

1. opening quotes: curly / guillemet opening quotes and backtick runs become tokens; a ``"`` at
   the start or after a space or opening bracket becomes the token ````` ``; a ``'`` opening a
   word (not a clitic such as ``'s``) is split from it;
2. punctuation: the final ``.`` of the text (before closing brackets / quotes) is split off;
   ``,`` and ``:`` are split unless a digit follows (``3,000`` and ``3:30`` stay whole); runs of
   two or more dots; ``; @ # $ % &``; unicode dashes; ``? !``; a ``'`` before a space; ``*``;
3. brackets ``( ) [ ] { } < >`` and ``--`` become tokens;
4. closing quotes: curly closing quotes; ``"`` and ``''`` become the token ``''``; the clitics
   ``'s 'm 'd 'll 're 've n't`` (and a lone ``'``) are split off the word before them;
5. the fused forms ``cannot gimme gonna gotta lemme wanna d'ye more'n 'tis 'twas`` are split
   in two (``can not``, ``gon na``, ...);
6. the result is split on whitespace.

Everything else stays inside its word: hyphens (``double-decker``), periods inside a word or
before another word (``st. louis`` keeps ``st.``), slashes, apostrophes inside words. nltk's
``word_tokenize`` first splits the text into sentences with the punkt model (whose data ships in
no package); a caption with a sentence break inside (``a man. he smiles.``) then has its inner
``.`` split off as well, while one Treebank pass keeps ``man.``: the single pass is what nltk
gives for one sentence (``preserve_line=True``), i.e. for almost every caption.

Reference: nltk's ``nltk/tokenize/destructive.py`` (the rule list) and the Penn Treebank
tokenisation conventions (R. MacIntyre's sed script).
"""

from __future__ import annotations

import re

__all__ = ["treebank_tokenize"]

#: (pattern, replacement, trigger characters): a rule whose pattern cannot match without one of
#: its trigger characters is skipped when the text holds none of them (most captions hold only
#: letters, spaces, commas, a final period and an apostrophe, so most rules are skipped).
_Rule = tuple["re.Pattern[str]", str, str]


def _rules(*rules: tuple[str, str, str]) -> list[_Rule]:
    return [(re.compile(pattern), repl, needs) for pattern, repl, needs in rules]


# closing brackets / quotes that may follow the final period of a text
_CLOSERS = "\\]\\)}>\"'"

# 1. opening quotes
_OPENING = _rules(
    ("([«“‘„]|`+)", r" \1 ", "«“‘„`"),
    (r'^"', "``", '"'),
    ("(``)", r" \1 ", "`"),
    (r"""([ (\[{<])("|'')""", r"\1 `` ", "\"'"),
    # a quote opening a word, unless it starts a clitic ('s 're 've 'll 'm 't 'd 'n)
    (r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", r"\1 ", "'"),
)

# 2. punctuation
_PUNCTUATION = _rules(
    # the final period, also before closing quotes written as unicode or a trailing space
    (f"([^.])(\\.)([{_CLOSERS}»”’ ]*)\\s*$", r"\1 \2 \3 ", "."),
    (r"([:,])([^\d])", r" \1 \2", ":,"),
    (r"([:,])$", r" \1 ", ":,"),
    (r"\.{2,}", r" \g<0> ", "."),
    (r"[;@#$%&]", r" \g<0> ", ";@#$%&"),
    ("[\u2012-\u2015]", r" \g<0> ", "\u2012\u2013\u2014\u2015"),  # figure / en / em dash, bar
    (f"([^.])(\\.)([{_CLOSERS}]*)\\s*$", r"\1 \2\3 ", "."),
    (r"[?!]", r" \g<0> ", "?!"),
    (r"([^'])' ", r"\1 ' ", "'"),
    (r"[*]", r" \g<0> ", "*"),
)

# 3. brackets and double dashes
_BRACKETS = _rules(
    (r"[\]\[(){}<>]", r" \g<0> ", "[](){}<>"),
    ("--", " -- ", "-"),
)

# 4. closing quotes and clitics (the text is padded with a space on both sides first)
_CLOSING = _rules(
    ("([»”’])", r" \1 ", "»”’"),
    ("''", " '' ", "'"),
    ('"', " '' ", '"'),
    (r"\s+", " ", ""),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 ", "'"),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 ", "'"),
)

# 5. fused forms split in two: "cannot" -> "can not", "gonna" -> "gon na", ...
_FUSED = _rules(
    *(
        (pattern, r" \1 \2 ", "")
        for pattern in (
            r"(?i)\b(can)(not)\b",
            r"(?i)\b(d)('ye)\b",
            r"(?i)\b(gim)(me)\b",
            r"(?i)\b(gon)(na)\b",
            r"(?i)\b(got)(ta)\b",
            r"(?i)\b(lem)(me)\b",
            r"(?i)\b(more)('n)\b",
            r"(?i)\b(wan)(na)(?=\s)",
            r"(?i) ('t)(is)\b",
            r"(?i) ('t)(was)\b",
        )
    )
)
# one search tells whether any fused form is present at all
_ANY_FUSED = re.compile(r"(?i)cannot|d'ye|gimme|gonna|gotta|lemme|more'n|wanna|'tis|'twas")


def _apply(rules: list[_Rule], text: str) -> str:
    for pattern, repl, needs in rules:
        if not needs or any(ch in text for ch in needs):
            text = pattern.sub(repl, text)
    return text


def treebank_tokenize(text: str) -> list[str]:
    """The Treebank tokens of ``text`` (one line; case is kept: lower-case it first).

    >>> treebank_tokenize("a dog's toy isn't \\"new\\", it's 3,000 years old...")
    ['a', 'dog', "'s", 'toy', 'is', "n't", '``', 'new', "''", ',', 'it', "'s", '3,000', 'years', 'old', '...']

    Args:
        text: a caption.

    Returns:
        The tokens in order (empty for an empty or all-whitespace string).
    """
    text = _apply(_OPENING, text)
    text = _apply(_PUNCTUATION, text)
    text = _apply(_BRACKETS, text)
    text = _apply(_CLOSING, f" {text} ")
    if _ANY_FUSED.search(text):
        text = _apply(_FUSED, text)
    return text.split()
