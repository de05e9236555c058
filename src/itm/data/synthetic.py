"""Seeded synthetic image-text data with planted concepts.

A *world* (drawn from ``world_seed`` and shared by all splits) holds ``n_concepts`` concepts,
each with a visual prototype (a random vector of ``img_dim`` dims) and a word naming it, plus
``n_distractors`` visual patterns that no word names and ``n_filler`` filler words that carry no
information. A *split* (drawn from its own ``seed``) holds images and captions:

- an image is ``n_regions`` region features. It shows a few distinct concepts; each sits in its
  own random region as the concept's prototype plus Gaussian noise. Every other region is
  background: a distractor pattern plus noise, or pure noise. All region kinds have unit
  variance per dimension, so neither norms nor positions give anything away;
- each of its captions names a random subset (at least one, by default two or three) of the
  image's concepts, in random order, among filler words drawn uniformly from the filler
  vocabulary. The captions of one image differ from each other.

Each region also has a random box (pixels, in an image of random size) drawn from a stream of its
own, independent of everything else: ``region_boxes`` / ``img_sizes``, and the PFAN position rows
built from them (``positions``, :func:`itm.data.pfan_positions`, computed on first use). They
carry no information about concepts; they exist so that position-aware encoders (PFAN) run on
the synthetic data, and adding them left every other value of a split unchanged.

An image and a caption match only through concepts, and a concept is visible only in one region
and named by one word, so a model has to learn which region goes with which word (and which
words to ignore) to retrieve well, and that suffices. Caption length, word positions and region
positions are independent of the image.

Chance level: with ``N`` test images and 5 captions each, text-to-image R@K = K/N and
image-to-text R@K = 1 - prod_{j<5} (5N - K - j) / (5N - j) ~= K/N. For the default 200 test
images: R@1/5/10 = 0.5/2.5/5.0 % in both directions (i2t 0.50/2.49/4.94 %), rsum ~ 16.

The concept sets of images overlap, so even a perfect model cannot separate two test images
whose concept sets both contain everything a caption names; with the defaults this ceiling is
close to 100 % R@10 and above ~90 % R@1 (measure with :func:`oracle_recall`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = ["SyntheticSplit", "SyntheticWorld", "generate_synthetic", "make_world", "oracle_recall"]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_WORLD_TAG = 0x5EED_0001  # separates the world's random streams from the splits'
_SPLIT_TAG = 0x5EED_0002
_BOX_TAG = 0x5EED_0003  # the boxes' own stream: drawing them changes nothing else


@dataclass(frozen=True)
class SyntheticWorld:
    """What all splits of one synthetic dataset share.

    Attributes:
        prototypes: float32 [n_concepts, img_dim], concept ``c``'s visual prototype (per-dim
            variance 1).
        distractors: float32 [n_distractors, img_dim], unnamed background patterns.
        concept_words: ``n_concepts`` distinct words; ``concept_words[c]`` names concept ``c``.
        filler_words: ``n_filler`` distinct words, disjoint from the concept words.
    """

    prototypes: np.ndarray
    distractors: np.ndarray
    concept_words: list[str]
    filler_words: list[str]


@dataclass
class SyntheticSplit:
    """One generated split.

    Satisfies the feature-store interface of :mod:`itm.data.datamodule` (``images``,
    ``captions``, ``cap_to_img``).

    Attributes:
        images: float32 [N, K, img_dim] region features.
        captions: ``N * captions_per_image`` strings; caption ``c`` belongs to image
            ``c // captions_per_image``.
        concepts: per image, int64 [m_i] the concept ids it shows.
        concept_regions: per image, int64 [m_i] the region holding ``concepts[i][j]``.
        caption_concepts: per caption, int64 [k_c] the concept ids it names, in caption order.
        cap_to_img: int64 [N * captions_per_image] image index of each caption.
        concept_words: the world's concept words (``concept_words[c]`` names concept ``c``).
        filler_words: the world's filler words.
        captions_per_image: captions per image (5).
        region_boxes: float32 [N, K, 4] random region boxes ``x1, y1, x2, y2`` in pixels
            (independent of the content; not called ``boxes`` so that pictures do not draw
            them as if they located anything).
        img_sizes: int64 [N, 2] image ``height, width`` in pixels.
    """

    images: np.ndarray
    captions: list[str]
    concepts: list[np.ndarray]
    concept_regions: list[np.ndarray]
    caption_concepts: list[np.ndarray]
    cap_to_img: np.ndarray
    concept_words: list[str] = field(repr=False)
    filler_words: list[str] = field(repr=False)
    captions_per_image: int = 5
    region_boxes: np.ndarray | None = field(default=None, repr=False)
    img_sizes: np.ndarray | None = field(default=None, repr=False)
    _positions: np.ndarray | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])

    @property
    def positions(self) -> np.ndarray | None:
        """float32 [N, K, 31] PFAN position rows of :attr:`region_boxes` (grid 16, 15 blocks;
        :func:`itm.data.pfan_positions`), built on first use; ``None`` without boxes."""
        if self._positions is None and self.region_boxes is not None:
            from itm.data.pfan import pfan_positions

            assert self.img_sizes is not None, "synthetic boxes come with their image sizes"
            self._positions = pfan_positions(self.region_boxes, self.img_sizes).astype(np.float32)
        return self._positions


def _make_words(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """Draw ``n`` distinct pronounceable made-up words (2-3 consonant-vowel syllables)."""
    words: list[str] = []
    while len(words) < n:
        n_syl = int(rng.integers(2, 4))
        word = "".join(
            _CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(n_syl)
        )
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def make_world(
    world_seed: int,
    *,
    n_concepts: int,
    img_dim: int,
    n_distractors: int,
    n_filler: int,
    word_style: Literal["pseudo", "index"] = "pseudo",
) -> SyntheticWorld:
    """Draw the shared prototypes and words of a synthetic world.

    Prototypes, distractors and words come from independent streams of ``world_seed``, and each
    is filled in order, so growing ``n_concepts`` keeps the existing concepts (same prototype,
    same word) and changing ``n_filler`` leaves prototypes and concept words alone.

    Args:
        world_seed: seed of the world.
        n_concepts: number of concepts.
        img_dim: region feature size D.
        n_distractors: number of unnamed background patterns.
        n_filler: size of the filler vocabulary.
        word_style: ``"pseudo"`` for made-up words (``"bokadu"``), ``"index"`` for ``c17`` /
            ``f3`` (handy for debugging).

    Returns:
        The world.
    """
    proto_ss, distr_ss, word_ss = np.random.SeedSequence([_WORLD_TAG, world_seed]).spawn(3)
    prototypes = np.random.default_rng(proto_ss).standard_normal((n_concepts, img_dim))
    distractors = np.random.default_rng(distr_ss).standard_normal((n_distractors, img_dim))
    if word_style == "index":
        concept_words = [f"c{i}" for i in range(n_concepts)]
        filler_words = [f"f{i}" for i in range(n_filler)]
    elif word_style == "pseudo":
        word_rng = np.random.default_rng(word_ss)
        taken: set[str] = set()
        concept_words = _make_words(word_rng, n_concepts, taken)
        filler_words = _make_words(word_rng, n_filler, taken)
    else:
        raise ValueError(f"word_style must be 'pseudo' or 'index', got {word_style!r}")
    return SyntheticWorld(
        prototypes=prototypes.astype(np.float32),
        distractors=distractors.astype(np.float32),
        concept_words=concept_words,
        filler_words=filler_words,
    )


def _as_range(value: tuple[int, int] | int, name: str) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be an int >= 1 or a range (lo, hi) with 1 <= lo <= hi")
    return lo, hi


def _draw_captions(
    rng: np.random.Generator,
    cids: np.ndarray,
    n_caps: int,
    k_range: tuple[int, int],
    w_range: tuple[int, int],
    world: SyntheticWorld,
) -> list[tuple[np.ndarray, str]]:
    """Draw ``n_caps`` distinct captions for an image showing concepts ``cids`` (int64 [m]).

    Returns:
        Per caption: (int64 [k] the concepts it names in caption order, the text).
    """
    m = len(cids)
    k_lo, k_hi = min(k_range[0], m), min(k_range[1], m)
    out: list[tuple[np.ndarray, str]] = []
    seen: set[str] = set()
    for _attempt in range(100):
        n = n_caps - len(out)
        ks = rng.integers(k_lo, k_hi + 1, size=n)  # [n] concepts named
        n_words = np.maximum(rng.integers(w_range[0], w_range[1] + 1, size=n), ks)  # [n]
        width = int(n_words.max())
        order = np.argsort(rng.random((n, m)), axis=1)  # [n, m] random concept order
        fillers = rng.integers(len(world.filler_words), size=(n, width))  # [n, width]
        slot_keys = rng.random((n, width))  # [n, width] random slot order
        slot_keys[np.arange(width)[None, :] >= n_words[:, None]] = np.inf
        slot_order = np.argsort(slot_keys, axis=1)
        for j in range(n):
            k, w = int(ks[j]), int(n_words[j])
            named = cids[order[j, :k]].astype(np.int64)
            words = [world.filler_words[f] for f in fillers[j, :w]]
            for slot, c in zip(np.sort(slot_order[j, :k]), named, strict=True):
                words[slot] = world.concept_words[c]
            text = " ".join(words)
            if text not in seen:
                seen.add(text)
                out.append((named, text))
        if len(out) == n_caps:
            return out
    raise ValueError("cannot draw distinct captions: widen words_per_caption or n_filler")


def generate_synthetic(
    n_images: int,
    *,
    seed: int | tuple[int, ...],
    world_seed: int = 0,
    n_concepts: int = 64,
    n_regions: int = 12,
    img_dim: int = 64,
    concepts_per_image: tuple[int, int] | int = (2, 4),
    concepts_per_caption: tuple[int, int] | int = (2, 3),
    words_per_caption: tuple[int, int] = (4, 12),
    n_filler: int = 100,
    n_distractors: int = 32,
    distractor_prob: float = 0.5,
    noise: float = 1.0,
    captions_per_image: int = 5,
    word_style: Literal["pseudo", "index"] = "pseudo",
) -> SyntheticSplit:
    """Generate one split of planted-concept image-text data.

    Ranges are inclusive ``(lo, hi)`` and drawn uniformly.

    Args:
        n_images: number of images N.
        seed: seed of this split (which images and captions are drawn); an int or a tuple of
            ints (e.g. ``(seed, split_index)``).
        world_seed: seed of the shared world (prototypes, distractors, words): splits meant to be
            used together must share it.
        n_concepts: number of concepts (named visual patterns).
        n_regions: regions per image K.
        img_dim: region feature size D.
        concepts_per_image: distinct concepts shown per image (at most ``n_regions``).
        concepts_per_caption: concepts named per caption, clipped to the image's count.
        words_per_caption: total words per caption (concept words + filler words); a caption
            encodes to this many ids plus ``<start>``/``<end>``. Raised to the number of
            concepts named where that is larger.
        n_filler: size of the filler vocabulary.
        n_distractors: number of unnamed background patterns.
        distractor_prob: probability that a background region shows a distractor (else pure
            noise).
        noise: standard deviation of the Gaussian noise added to a prototype (relative to its
            unit per-dim scale); the sum is rescaled by ``1 / sqrt(1 + noise**2)``.
        captions_per_image: captions per image (5 in the public datasets).
        word_style: ``"pseudo"`` made-up words or ``"index"`` words ``c17`` / ``f3``.

    Returns:
        The split; the same arguments always give the same split.
    """
    c_lo, c_hi = _as_range(concepts_per_image, "concepts_per_image")
    k_lo, k_hi = _as_range(concepts_per_caption, "concepts_per_caption")
    w_lo, w_hi = _as_range(words_per_caption, "words_per_caption")
    if c_hi > n_regions or c_hi > n_concepts:
        raise ValueError(
            f"concepts_per_image {concepts_per_image} exceeds n_regions={n_regions} "
            f"or n_concepts={n_concepts}"
        )
    if n_images < 0 or captions_per_image < 1 or n_filler < 1:
        raise ValueError("need n_images >= 0, captions_per_image >= 1 and n_filler >= 1")
    if distractor_prob > 0 and n_distractors < 1:
        raise ValueError("distractor_prob > 0 needs n_distractors >= 1")

    world = make_world(
        world_seed,
        n_concepts=n_concepts,
        img_dim=img_dim,
        n_distractors=n_distractors,
        n_filler=n_filler,
        word_style=word_style,
    )
    seed_seq = (seed,) if isinstance(seed, int) else tuple(int(s) for s in seed)
    rng = np.random.default_rng([_SPLIT_TAG, world_seed, *seed_seq])
    scale = 1.0 / np.sqrt(1.0 + noise**2)

    # Background first (vectorised): pure noise, some regions replaced by distractor + noise.
    images = rng.standard_normal((n_images, n_regions, img_dim))
    if distractor_prob > 0:
        use = rng.random((n_images, n_regions)) < distractor_prob
        which = rng.integers(n_distractors, size=int(use.sum()))
        images[use] = (world.distractors[which] + noise * images[use]) * scale

    concepts: list[np.ndarray] = []
    concept_regions: list[np.ndarray] = []
    caption_concepts: list[np.ndarray] = []
    captions: list[str] = []
    for i in range(n_images):
        m = int(rng.integers(c_lo, c_hi + 1))
        cids = rng.choice(n_concepts, size=m, replace=False)
        regions = rng.choice(n_regions, size=m, replace=False)
        eps = rng.standard_normal((m, img_dim))
        images[i, regions] = (world.prototypes[cids] + noise * eps) * scale
        concepts.append(cids.astype(np.int64))
        concept_regions.append(regions.astype(np.int64))

        for named, text in _draw_captions(
            rng, cids, captions_per_image, (k_lo, k_hi), (w_lo, w_hi), world
        ):
            captions.append(text)
            caption_concepts.append(named)

    cap_to_img = np.repeat(np.arange(n_images, dtype=np.int64), captions_per_image)
    boxes, sizes = _draw_boxes(
        np.random.default_rng([_BOX_TAG, world_seed, *seed_seq]), n_images, n_regions
    )
    return SyntheticSplit(
        images=images.astype(np.float32),
        captions=captions,
        concepts=concepts,
        concept_regions=concept_regions,
        caption_concepts=caption_concepts,
        cap_to_img=cap_to_img,
        concept_words=world.concept_words,
        filler_words=world.filler_words,
        captions_per_image=captions_per_image,
        region_boxes=boxes,
        img_sizes=sizes,
    )


def _draw_boxes(
    rng: np.random.Generator, n_images: int, n_regions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random region boxes: float32 [N, K, 4] pixels and int64 [N, 2] image sizes (h, w).

    Image sides are 256-640 pixels; a box side is a fraction of the image side drawn from a mix
    of small (0.05-0.3), medium (0.3-0.7) and large (0.6-1.0) extents (large boxes cover more
    than 15 whole grid blocks, the case where PFAN's tie order matters), placed uniformly."""
    sizes = rng.integers(256, 641, size=(n_images, 2))  # [N, 2] height, width
    kind = rng.choice(3, size=(n_images, n_regions, 2), p=(0.5, 0.3, 0.2))
    lo = np.array([0.05, 0.3, 0.6])[kind]
    hi = np.array([0.3, 0.7, 1.0])[kind]
    frac = lo + (hi - lo) * rng.random((n_images, n_regions, 2))  # [N, K, 2] of (w, h)
    start = (1.0 - frac) * rng.random((n_images, n_regions, 2))
    wh = sizes[:, None, ::-1].astype(np.float64)  # [N, 1, 2] (w, h)
    boxes = np.concatenate([start * wh, (start + frac) * wh], axis=-1)  # x1, y1, x2, y2
    return boxes.astype(np.float32), sizes.astype(np.int64)


def oracle_recall(
    split: SyntheticSplit, ks: tuple[int, ...] = (1, 5, 10), seed: int = 0
) -> dict[str, float]:
    """Recall (in %) of an ideal bag-of-concepts matcher: the ceiling the data allows.

    The oracle scores (image, caption) by the number of named concepts the image shows; ties
    (images showing everything a caption names) are broken at random, which is the best any
    model can do on average.

    Args:
        split: a generated split.
        ks: the K of R@K.
        seed: seed of the random tie-breaking.

    Returns:
        ``{"i2t_r{K}": ..., "t2i_r{K}": ...}`` in percent.
    """
    n_img, n_cap = len(split), len(split.captions)
    n_concepts = len(split.concept_words)
    shows = np.zeros((n_img, n_concepts))  # [N, C]
    for i, cids in enumerate(split.concepts):
        shows[i, cids] = 1.0
    named = np.zeros((n_cap, n_concepts))  # [5N, C]
    for c, cids in enumerate(split.caption_concepts):
        named[c, cids] = 1.0
    tie = np.random.default_rng(seed).random((n_img, n_cap)) * 1e-3
    sims = shows @ named.T + tie  # [N, 5N]
    gt = sims[split.cap_to_img, np.arange(n_cap)]  # [5N] score of each caption's own image
    t2i_rank = (sims > gt[None, :]).sum(0)  # [5N] 0-based rank of the true image
    own = split.cap_to_img[None, :] == np.arange(n_img)[:, None]  # [N, 5N]
    best = np.where(own, sims, -np.inf).max(1)  # [N] best score among an image's captions
    i2t_rank = (sims > best[:, None]).sum(1)  # [N] 0-based rank of the first true caption
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).mean())
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).mean())
    return out
