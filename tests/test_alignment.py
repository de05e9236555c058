"""Learning tests that can fail: after a short training on the synthetic data, do concept words
attend to the region that holds their concept?

The synthetic data plant the ground truth (which region shows which concept, which word names
it; ``itm.data.synthetic``), so a region-word head's alignment picture can be checked against
it, not only its recall: a head with broken attention can still retrieve far above chance. The
criterion (:func:`assert_attends_to_planted`) is that the most-weighted region of a concept word
is its planted region for at least 35 % of the concept words (chance: 1 / 12 = 8.3 %). It is
shown to fail for a broken-attention control (SCAN with a zero softmax temperature: uniform
attention) and for the ``global`` head, which has no region-word alignment at all.

Every configured head whose alignment picture is a distribution is tested, discovered from
``conf/model/align/*.yaml``.
"""

from __future__ import annotations

import pytest

import conformance as C
from itm.metrics import recall_at_k
from trained import SLOW_TO_TRAIN, chance_rsum, head_budget, planted_alignment, score_split, trained

#: the criterion: fraction of concept words whose most-weighted region is their planted one
MIN_HIT = 0.35

REGION_WORD_HEADS = [n for n in C.discover("model/align") if n != "global"]


def assert_attends_to_planted(overrides: tuple[str, ...], epochs: int = 2) -> dict[str, float]:
    model, dm = trained(overrides, epochs)
    res = planted_alignment(model, dm)
    assert res["n"] >= 100, res
    assert res["hit"] >= MIN_HIT, f"concept words attend elsewhere: {res}"
    return res


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_TRAIN else n
        for n in REGION_WORD_HEADS
    ],
)
def test_concept_words_attend_to_their_planted_region(name):
    head = C.build_head(name).align
    assert head.alignment_normalised is not None, f"{name}: its picture is not a distribution"
    extra, epochs = head_budget(name)
    res = assert_attends_to_planted((f"model/align={name}", *extra), epochs)
    if head.alignment_normalised == "regions":  # most of the weight, not only the argmax
        assert res["weight"] >= 3 * res["chance"], res


def test_broken_attention_fails_the_alignment_test_but_still_retrieves():
    """SCAN with lambda_softmax = 0 attends uniformly: the alignment test must catch it, though
    its retrieval is far above chance (which is why recall alone cannot)."""
    overrides = ("model/align=scan", "model.align.lambda_softmax=0")
    with pytest.raises(AssertionError, match="attend elsewhere"):
        assert_attends_to_planted(overrides)
    model, dm = trained(overrides)
    res = planted_alignment(model, dm)
    assert res["hit"] < 1.5 * res["chance"], res
    sims = score_split(model, dm)
    assert recall_at_k(sims)["rsum"] > 2 * chance_rsum(sims.shape[0])  # measured: 159 vs 53


def test_the_global_head_fails_the_alignment_test():
    """VSE-infinity's global head pools features: its fragment cosines do not single out the
    planted region."""
    with pytest.raises(AssertionError, match="attend elsewhere"):
        assert_attends_to_planted(("model/align=global", "pooling=gpo"))
