"""Data: vocabulary, synthetic generator, datasets, collate functions, DataModules, and PFAN's
position rows (:func:`pfan_positions`)."""

from itm.data.datamodule import (
    SPLITS,
    ArraySplit,
    CaptionDataset,
    CaptionPairDataset,
    FeatureStore,
    ImageDataset,
    ITMDataModule,
    SyntheticDataModule,
    collate_captions,
    collate_images,
    collate_pairs,
)
from itm.data.pfan import pfan_positions
from itm.data.precomp import FeatureSplit, NpyImages, PrecompDataModule, find_vocab, open_npy_split
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

__all__ = [
    "END_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "SPLITS",
    "START_ID",
    "UNK_ID",
    "ArraySplit",
    "CaptionDataset",
    "CaptionPairDataset",
    "DataError",
    "DataWarning",
    "FeatureSplit",
    "FeatureStore",
    "ITMDataModule",
    "ImageDataset",
    "NpyImages",
    "PrecompDataModule",
    "SyntheticDataModule",
    "SyntheticSplit",
    "SyntheticWorld",
    "Vocabulary",
    "collate_captions",
    "collate_images",
    "collate_pairs",
    "find_vocab",
    "generate_synthetic",
    "make_world",
    "open_npy_split",
    "oracle_recall",
    "pfan_positions",
    "tokenize",
]
