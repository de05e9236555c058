"""Data: vocabulary, synthetic generator, feature stores (:mod:`itm.data.stores`), datasets,
collate functions, DataModules, and PFAN's position rows (:func:`pfan_positions`).

Names are imported on first use (PEP 562), so that ``import itm.data.<module>`` of a module that
needs neither torch nor Lightning (``itm.data.prepare``, the stores, the vocabulary) does not
load them through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from itm.data.datamodule import (
        ArraySplit,
        CaptionDataset,
        CaptionPairDataset,
        ImageDataset,
        ITMDataModule,
        SyntheticDataModule,
        collate_captions,
        collate_images,
        collate_pairs,
        encode_caption,
    )
    from itm.data.pfan import pfan_positions
    from itm.data.precomp import PrecompDataModule, find_vocab
    from itm.data.splits import SPLITS
    from itm.data.stores import FeatureSplit, FeatureStore, NpyImages, open_npy_split
    from itm.data.synthetic import (
        SyntheticSplit,
        SyntheticWorld,
        generate_synthetic,
        make_world,
        oracle_recall,
    )
    from itm.data.validation import DataError, DataWarning
    from itm.data.vocab import (
        END_ID,
        PAD_ID,
        SPECIAL_TOKENS,
        START_ID,
        UNK_ID,
        Vocabulary,
        tokenize,
    )

#: public name -> the module that defines it
_WHERE: dict[str, str] = {
    **dict.fromkeys(
        (
            "ArraySplit",
            "CaptionDataset",
            "CaptionPairDataset",
            "ITMDataModule",
            "ImageDataset",
            "SyntheticDataModule",
            "collate_captions",
            "collate_images",
            "collate_pairs",
            "encode_caption",
        ),
        "itm.data.datamodule",
    ),
    "pfan_positions": "itm.data.pfan",
    **dict.fromkeys(("PrecompDataModule", "find_vocab"), "itm.data.precomp"),
    "SPLITS": "itm.data.splits",
    **dict.fromkeys(
        ("FeatureSplit", "FeatureStore", "NpyImages", "open_npy_split"), "itm.data.stores"
    ),
    **dict.fromkeys(
        ("SyntheticSplit", "SyntheticWorld", "generate_synthetic", "make_world", "oracle_recall"),
        "itm.data.synthetic",
    ),
    **dict.fromkeys(("DataError", "DataWarning"), "itm.data.validation"),
    **dict.fromkeys(
        ("END_ID", "PAD_ID", "SPECIAL_TOKENS", "START_ID", "UNK_ID", "Vocabulary", "tokenize"),
        "itm.data.vocab",
    ),
}

__all__ = [
    "ArraySplit",
    "CaptionDataset",
    "CaptionPairDataset",
    "DataError",
    "DataWarning",
    "END_ID",
    "FeatureSplit",
    "FeatureStore",
    "ITMDataModule",
    "ImageDataset",
    "NpyImages",
    "PAD_ID",
    "PrecompDataModule",
    "SPECIAL_TOKENS",
    "SPLITS",
    "START_ID",
    "SyntheticDataModule",
    "SyntheticSplit",
    "SyntheticWorld",
    "UNK_ID",
    "Vocabulary",
    "collate_captions",
    "collate_images",
    "collate_pairs",
    "encode_caption",
    "find_vocab",
    "generate_synthetic",
    "make_world",
    "open_npy_split",
    "oracle_recall",
    "pfan_positions",
    "tokenize",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'itm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
