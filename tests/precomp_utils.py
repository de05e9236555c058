"""Writers of tiny datasets in the precomp layout (2048-d region features) for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from itm.data import Vocabulary, generate_synthetic

SPLIT_SIZES = {"train": 24, "dev": 8, "test": 8}
SPLIT_INDEX = {"train": 1, "dev": 2, "test": 3, "testall": 4}


def tiny_split(split: str, n_images: int, n_regions: int = 6, img_dim: int = 2048, cpi: int = 5):
    """A planted-concept split (images float32 [n, K, D], captions) of one shared world."""
    return generate_synthetic(
        n_images,
        seed=(0, SPLIT_INDEX[split]),
        world_seed=0,
        n_concepts=16,
        n_regions=n_regions,
        img_dim=img_dim,
        concepts_per_image=(2, 3),
        words_per_caption=(4, 8),
        n_filler=20,
        n_distractors=4,
        captions_per_image=cpi,
    )


def write_precomp(
    root: Path,
    sizes: dict[str, int] | None = None,
    *,
    n_regions: int = 6,
    img_dim: int = 2048,
    cpi: int = 5,
    vocab: bool = True,
    ids: bool = False,
    boxes: bool = False,
) -> Path:
    """Write ``<split>_ims.npy`` / ``<split>_caps.txt`` (+ ids, boxes) and a SCAN vocab json."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train_caps: list[str] = []
    for split, n in (sizes or SPLIT_SIZES).items():
        data = tiny_split(split, n, n_regions, img_dim, cpi)
        np.save(root / f"{split}_ims.npy", data.images)
        (root / f"{split}_caps.txt").write_text("\n".join(data.captions) + "\n", encoding="utf-8")
        if ids:
            (root / f"{split}_ids.txt").write_text(
                "\n".join(str(1000 + i) for i in range(n)) + "\n"
            )
        if boxes:
            b = np.random.default_rng(0).random((n, n_regions, 4)).astype(np.float32)
            np.save(root / f"{split}_boxes.npy", b)
        if split == "train":
            train_caps = data.captions
    if vocab:
        Vocabulary.build(train_caps, threshold=1).to_json(root / "tiny_precomp_vocab.json")
    return root
