"""Datasets, collate functions and LightningDataModules for image-text matching.

The datasets work on any *feature store*: an object with

- ``images``: array-like [N, K, D] indexable per image (``images[i]`` -> [K, D]; a numpy array,
  a memory map, an HDF5 dataset ...),
- ``captions``: list[str] of length N_cap,
- ``cap_to_img``: int array [N_cap], the image index of each caption.

Batches are dicts of tensors (see :func:`collate_pairs`, :func:`collate_images`,
:func:`collate_captions`). Per-region inputs beyond the features (PFAN's ``positions``) are
served only when the image encoder declares them (``extra_inputs``; see
:attr:`ITMDataModule.image_inputs`): the store then provides an array-like attribute of that
name, ``[N, K, W]``, and batches carry it as float32 ``[B, K, W]`` (zeros past each length). Captions are padded with ``<pad>`` = 0 and are NOT sorted by length
(the BiGRU packs with ``enforce_sorted=False``), so evaluation batches keep dataset order.

Everything here is picklable (no open handles, no lambdas), as ``ddp_spawn`` and DataLoader
workers require; caches are dropped on pickling and rebuilt lazily in the receiving process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from itm.data.splits import SPLITS
from itm.data.stores.base import FeatureStore
from itm.data.synthetic import SyntheticSplit, generate_synthetic
from itm.data.vocab import PAD_ID, Vocabulary

__all__ = [
    "SPLITS",
    "ArraySplit",
    "CaptionDataset",
    "CaptionPairDataset",
    "FeatureStore",
    "ITMDataModule",
    "ImageDataset",
    "SyntheticDataModule",
    "collate_captions",
    "collate_images",
    "collate_pairs",
    "encode_caption",
]


@dataclass
class ArraySplit:
    """An in-memory feature store.

    Attributes:
        images: float array [N, K, D].
        captions: N_cap caption strings.
        cap_to_img: int64 [N_cap] image index of each caption (defaults to 5 consecutive
            captions per image when built with :meth:`from_arrays`).
    """

    images: np.ndarray
    captions: list[str]
    cap_to_img: np.ndarray

    def __post_init__(self) -> None:
        self.cap_to_img = np.asarray(self.cap_to_img, dtype=np.int64)
        if np.ndim(self.images) != 3:
            raise ValueError(f"images must be [N, K, D], got shape {np.shape(self.images)}")
        if self.cap_to_img.shape != (len(self.captions),):
            raise ValueError(
                f"cap_to_img has shape {self.cap_to_img.shape}, expected ({len(self.captions)},)"
            )
        n = len(self.images)
        if len(self.cap_to_img) and (self.cap_to_img.min() < 0 or self.cap_to_img.max() >= n):
            raise ValueError(f"cap_to_img holds image indices outside [0, {n})")

    @classmethod
    def from_arrays(
        cls, images: np.ndarray, captions: list[str], captions_per_image: int = 5
    ) -> ArraySplit:
        """Build a split whose captions come in consecutive groups of ``captions_per_image``.

        Args:
            images: float array [N, K, D].
            captions: ``N * captions_per_image`` strings.
            captions_per_image: captions per image.
        """
        n = len(images)
        if len(captions) != n * captions_per_image:
            raise ValueError(
                f"{len(captions)} captions for {n} images: expected {captions_per_image} per image"
            )
        cap_to_img = np.repeat(np.arange(n, dtype=np.int64), captions_per_image)
        return cls(images=images, captions=list(captions), cap_to_img=cap_to_img)


def _image(store: FeatureStore, idx: int) -> torch.Tensor:
    """float32 [K, D] features of image ``idx`` (a copy, never a view of a memory map)."""
    return torch.from_numpy(np.array(store.images[idx], dtype=np.float32))


def encode_caption(tokenizer: Any, caption: str) -> torch.Tensor:
    """int64 ``[L]`` token ids of ``caption`` (end tokens included): the one place a caption
    becomes ids. ``tokenizer`` is a :class:`~itm.data.vocab.Vocabulary` or any caption tokenizer
    with ``encode(caption) -> list[int]`` (a BERT tokenizer; see
    :attr:`ITMDataModule.caption_tokenizer`)."""
    return torch.tensor(list(tokenizer.encode(caption)), dtype=torch.int64)


#: per-region inputs a store may provide beyond the features (what ``extra_inputs`` may name)
IMAGE_INPUTS: tuple[str, ...] = ("positions",)


def check_image_inputs(store: FeatureStore, names: tuple[str, ...], split: str) -> None:
    """Every per-region input in ``names`` is present in ``store``, ``[N, K, W]`` like its
    features; raises a ``DataError`` naming the split and what to do otherwise."""
    from itm.data.validation import DataError

    where = getattr(store, "images_file", None) or f"split {split!r}"
    for name in names:
        if name not in IMAGE_INPUTS:
            raise ValueError(
                f"the image encoder asks for the input {name!r}; the data can serve "
                f"{list(IMAGE_INPUTS)}"
            )
        arr = getattr(store, name, None)
        if arr is None:
            hint = (
                f" (build <split>_positions.npy with `itm-prepare pfan-positions DIR` from "
                f"{split}_boxes.npy [N, K, 4] and {split}_img_sizes.npy [N, 2])"
                if name == "positions"
                else ""
            )
            raise DataError(
                where,
                f"the image encoder needs per-region {name!r} but split {split!r} has none" + hint,
            )
        shape, images = tuple(arr.shape), tuple(store.images.shape)
        if len(shape) != 3 or shape[:2] != images[:2]:
            raise DataError(
                getattr(store, f"{name}_file", None) or where,
                f"{name} have shape {shape}; expected [{images[0]}, {images[1]}, W] to match "
                f"the features {images}",
            )


def _image_extras(store: FeatureStore, idx: int, names: tuple[str, ...]) -> dict[str, Any]:
    """float32 ``[K, W]`` per-region inputs of image ``idx`` (copies)."""
    return {n: torch.from_numpy(np.array(getattr(store, n)[idx], dtype=np.float32)) for n in names}


class CaptionPairDataset(Dataset):
    """Training pairs: one item per caption, with its image.

    Item: ``{"image": float32 [K, D], "caption": int64 [L] (with <start>/<end>),
    "cap_id": int, "img_id": int}``, plus ``"extras": {name: float32 [K, W]}`` when
    ``image_inputs`` names per-region inputs of the store (e.g. ``("positions",)``).
    """

    def __init__(
        self, store: FeatureStore, vocab: Vocabulary, image_inputs: tuple[str, ...] = ()
    ) -> None:
        self.store = store
        self.vocab = vocab
        self.image_inputs = tuple(image_inputs)

    def __len__(self) -> int:
        return len(self.store.captions)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        img_id = int(self.store.cap_to_img[idx])
        item = {
            "image": _image(self.store, img_id),
            "caption": encode_caption(self.vocab, self.store.captions[idx]),
            "cap_id": int(idx),
            "img_id": img_id,
        }
        if self.image_inputs:
            item["extras"] = _image_extras(self.store, img_id, self.image_inputs)
        return item


class ImageDataset(Dataset):
    """Evaluation images: every image of the split once.

    Item: ``{"image": float32 [K, D], "img_id": int}`` (plus ``"extras"`` as
    :class:`CaptionPairDataset`).
    """

    def __init__(self, store: FeatureStore, image_inputs: tuple[str, ...] = ()) -> None:
        self.store = store
        self.image_inputs = tuple(image_inputs)

    def __len__(self) -> int:
        return len(self.store.images)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item = {"image": _image(self.store, idx), "img_id": int(idx)}
        if self.image_inputs:
            item["extras"] = _image_extras(self.store, idx, self.image_inputs)
        return item


class CaptionDataset(Dataset):
    """Evaluation captions: every caption of the split once.

    Item: ``{"caption": int64 [L], "cap_id": int, "cap_img_id": int}``.
    """

    def __init__(self, store: FeatureStore, vocab: Vocabulary) -> None:
        self.store = store
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.store.captions)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {
            "caption": encode_caption(self.vocab, self.store.captions[idx]),
            "cap_id": int(idx),
            "cap_img_id": int(self.store.cap_to_img[idx]),
        }


def _pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [K_i, D] images into float32 [B, K_max, D] (zeros past K_i) and int64 [B] K_i."""
    lens = torch.tensor([im.shape[0] for im in images], dtype=torch.int64)
    if bool((lens == lens[0]).all()):
        # np.stack: one fresh buffer filled by one thread; torch.stack on 2 threads was ~5x
        # slower on a 37 MB batch (page faults of the fresh buffer contended between threads).
        return torch.from_numpy(np.stack([im.numpy() for im in images])), lens
    out = images[0].new_zeros((len(images), int(lens.max()), images[0].shape[1]))
    for i, im in enumerate(images):
        out[i, : im.shape[0]] = im
    return out, lens


def _pad_captions(captions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad int64 [L_i] token ids into int64 [B, L_max] (``<pad>`` = 0) and int64 [B] L_i."""
    lens = torch.tensor([len(c) for c in captions], dtype=torch.int64)
    out = torch.full((len(captions), int(lens.max())), PAD_ID, dtype=torch.int64)
    for i, c in enumerate(captions):
        out[i, : len(c)] = c
    return out, lens


def _collate_extras(batch: list[dict[str, Any]], out: dict[str, torch.Tensor]) -> None:
    """Per-region inputs of the items (``"extras"``), each padded like the images."""
    for name in batch[0].get("extras", {}):
        out[name] = _pad_images([b["extras"][name] for b in batch])[0]


def collate_pairs(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate :class:`CaptionPairDataset` items.

    Returns:
        ``images`` float32 [B, K, D], ``img_lens`` int64 [B], ``captions`` int64 [B, L]
        (pad 0), ``cap_lens`` int64 [B] (counting <start>/<end>), ``img_ids`` int64 [B],
        ``cap_ids`` int64 [B]; and each served per-region input (``positions`` float32
        [B, K, W]).
    """
    images, img_lens = _pad_images([b["image"] for b in batch])
    captions, cap_lens = _pad_captions([b["caption"] for b in batch])
    out = {
        "images": images,
        "img_lens": img_lens,
        "captions": captions,
        "cap_lens": cap_lens,
        "img_ids": torch.tensor([b["img_id"] for b in batch], dtype=torch.int64),
        "cap_ids": torch.tensor([b["cap_id"] for b in batch], dtype=torch.int64),
    }
    _collate_extras(batch, out)
    return out


def collate_images(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate :class:`ImageDataset` items.

    Returns:
        ``images`` float32 [B, K, D], ``img_lens`` int64 [B], ``img_ids`` int64 [B]; and each
        served per-region input (``positions`` float32 [B, K, W]).
    """
    images, img_lens = _pad_images([b["image"] for b in batch])
    out = {
        "images": images,
        "img_lens": img_lens,
        "img_ids": torch.tensor([b["img_id"] for b in batch], dtype=torch.int64),
    }
    _collate_extras(batch, out)
    return out


def collate_captions(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Collate :class:`CaptionDataset` items.

    Returns:
        ``captions`` int64 [B, L] (pad 0), ``cap_lens`` int64 [B], ``cap_ids`` int64 [B],
        ``cap_img_ids`` int64 [B] (image index of each caption).
    """
    captions, cap_lens = _pad_captions([b["caption"] for b in batch])
    return {
        "captions": captions,
        "cap_lens": cap_lens,
        "cap_ids": torch.tensor([b["cap_id"] for b in batch], dtype=torch.int64),
        "cap_img_ids": torch.tensor([b["cap_img_id"] for b in batch], dtype=torch.int64),
    }


class ITMDataModule(pl.LightningDataModule):
    """Generic image-text matching data: subclasses say how to load a split and the vocabulary.

    Subclasses implement :meth:`load_split` (a :class:`FeatureStore` per split name) and
    :meth:`load_vocab`. Splits and vocabulary are loaded lazily and cached, so ``vocab``,
    ``vocab_size``, ``img_dim`` and ``n_regions`` work before the Trainer calls :meth:`setup`
    (the training script reads them to build the model). Pickling drops the caches.

    The training loader shuffles and keeps the last, smaller batch (``drop_last=False``, as the
    reference SCAN code): every caption is seen each epoch; the hinge loss works for any batch
    size (a batch of one contributes zero). Validation and test loaders are lists
    ``[image_loader, caption_loader]`` over the dev / test split, in dataset order.

    Args:
        batch_size: training batch size (caption-image pairs).
        eval_batch_size: batch size of the evaluation loaders.
        num_workers: DataLoader workers (workers are persistent when > 0).
        pin_memory: pin host memory in the loaders.
    """

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._splits: dict[str, FeatureStore] = {}
        self._vocab: Vocabulary | None = None
        #: caption tokenizer replacing the word vocabulary (e.g. a BERT tokenizer); see
        #: :attr:`caption_tokenizer`.
        self.tokenizer: Any = None
        #: per-region inputs to serve beside the features (names from
        #: :data:`IMAGE_INPUTS`), set from the image encoder's ``extra_inputs`` by the training
        #: and evaluation scripts; empty = features only.
        self.image_inputs: tuple[str, ...] = ()

    # ---- to implement -------------------------------------------------------------------------
    def load_split(self, split: str) -> FeatureStore:
        """Load split ``split`` (one of :data:`SPLITS`); raise ``ValueError`` if unavailable."""
        raise NotImplementedError

    def load_vocab(self) -> Vocabulary:
        """Load or build the vocabulary."""
        raise NotImplementedError

    # ---- cached access ------------------------------------------------------------------------
    def get_split(self, split: str) -> FeatureStore:
        """The (cached) feature store of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if split not in self._splits:
            self._splits[split] = self.load_split(split)
        return self._splits[split]

    def cap_to_img(self, split: str) -> np.ndarray:
        """int64 [N_cap] image index of each caption of ``split``."""
        return np.asarray(self.get_split(split).cap_to_img, dtype=np.int64)

    @property
    def vocab(self) -> Vocabulary:
        """The word vocabulary (loaded on first use)."""
        if self._vocab is None:
            self._vocab = self.load_vocab()
        return self._vocab

    @property
    def caption_tokenizer(self) -> Any:
        """What turns a caption into token ids: :attr:`tokenizer` when set (BERT), else the
        word vocabulary. Anything with ``encode(caption) -> list[int]`` (pad id 0) works."""
        return self.tokenizer if self.tokenizer is not None else self.vocab

    def encode_caption(self, caption: str) -> torch.Tensor:
        """int64 ``[L]`` ids of ``caption`` under :attr:`caption_tokenizer`, exactly as the
        datasets serve them (:func:`encode_caption`)."""
        return encode_caption(self.caption_tokenizer, caption)

    @property
    def vocab_size(self) -> int:
        """Number of word ids (embedding table size)."""
        return len(self.vocab)

    @property
    def img_dim(self) -> int:
        """Region feature size D."""
        return int(self.get_split("train").images.shape[-1])

    @property
    def n_regions(self) -> int:
        """Regions per image K (the padded size)."""
        return int(self.get_split("train").images.shape[1])

    # ---- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load the splits ``stage`` needs (fit: train + dev; validate: dev; test: test)."""
        needed = {
            "fit": ("train", "dev"),
            "validate": ("dev",),
            "test": ("test",),
            None: ("train", "dev", "test"),
        }.get(stage, ())
        for split in needed:
            self._image_inputs_of(split)  # loads the split; checks what the encoder needs
        _ = self.caption_tokenizer  # the word vocabulary unless a tokenizer (BERT) replaces it

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, collate: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
            drop_last=False,
        )

    def _image_inputs_of(self, split: str) -> tuple[str, ...]:
        """:attr:`image_inputs`, checked to be present in ``split``."""
        names = tuple(self.image_inputs)
        if names:
            check_image_inputs(self.get_split(split), names, split)
        return names

    def train_dataloader(self) -> DataLoader:
        """Shuffled caption-image pairs of the train split (see :func:`collate_pairs`)."""
        ds = CaptionPairDataset(
            self.get_split("train"), self.caption_tokenizer, self._image_inputs_of("train")
        )
        return self._loader(ds, self.batch_size, True, collate_pairs)

    def eval_dataloaders(self, split: str) -> list[DataLoader]:
        """``[image_loader, caption_loader]`` over ``split``, each in dataset order."""
        store = self.get_split(split)
        images = ImageDataset(store, self._image_inputs_of(split))
        return [
            self._loader(images, self.eval_batch_size, False, collate_images),
            self._loader(
                CaptionDataset(store, self.caption_tokenizer),
                self.eval_batch_size,
                False,
                collate_captions,
            ),
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """``[image_loader, caption_loader]`` over the dev split."""
        return self.eval_dataloaders("dev")

    def test_dataloader(self) -> list[DataLoader]:
        """``[image_loader, caption_loader]`` over the test split."""
        return self.eval_dataloaders("test")

    # ---- pickling -----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_splits"] = {}
        state["_vocab"] = None
        return state


class SyntheticDataModule(ITMDataModule):
    """The built-in planted-concept dataset (see :mod:`itm.data.synthetic`).

    ``seed`` is the world seed (shared prototypes and words) and, with the split's index, the
    seed of each split, so train, dev and test are distinct draws of one world. The vocabulary is
    built from the train captions with threshold 1. ``img_dim`` and ``n_regions`` come from the
    arguments; ``vocab_size`` generates the train split on first use.

    Args:
        seed: seed of the dataset.
        n_train, n_dev, n_test: images per split (5 captions each); ``testall`` is the test split.
        n_concepts, n_regions, img_dim, concepts_per_image, concepts_per_caption,
        words_per_caption, n_filler, n_distractors, distractor_prob, noise, word_style:
            see :func:`itm.data.synthetic.generate_synthetic`.
        batch_size, eval_batch_size, num_workers, pin_memory: see :class:`ITMDataModule`.
    """

    _SPLIT_INDEX = {"train": 1, "dev": 2, "test": 3, "testall": 3}

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 2000,
        n_dev: int = 200,
        n_test: int = 200,
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
        word_style: str = "pseudo",
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        self.save_hyperparameters()
        self.seed = int(seed)
        self.split_sizes = {"train": n_train, "dev": n_dev, "test": n_test, "testall": n_test}
        # Hydra passes ListConfig for ranges: make them plain tuples (picklable, hashable).
        self.generator_kwargs: dict[str, Any] = {
            "n_concepts": n_concepts,
            "n_regions": n_regions,
            "img_dim": img_dim,
            "concepts_per_image": _plain(concepts_per_image),
            "concepts_per_caption": _plain(concepts_per_caption),
            "words_per_caption": _plain(words_per_caption),
            "n_filler": n_filler,
            "n_distractors": n_distractors,
            "distractor_prob": distractor_prob,
            "noise": noise,
            "word_style": word_style,
        }

    def load_split(self, split: str) -> SyntheticSplit:
        """Generate ``split`` deterministically from ``seed``."""
        return generate_synthetic(
            self.split_sizes[split],
            seed=(self.seed, self._SPLIT_INDEX[split]),
            world_seed=self.seed,
            **self.generator_kwargs,
        )

    def load_vocab(self) -> Vocabulary:
        """Every word of the train captions (threshold 1)."""
        return Vocabulary.build(self.get_split("train").captions, threshold=1)

    @property
    def img_dim(self) -> int:
        """Region feature size D (from the arguments; no generation needed)."""
        return int(self.generator_kwargs["img_dim"])

    @property
    def n_regions(self) -> int:
        """Regions per image K (from the arguments; no generation needed)."""
        return int(self.generator_kwargs["n_regions"])


def _plain(value: Any) -> Any:
    """An int stays an int; any sequence (list, tuple, OmegaConf ListConfig) becomes a tuple."""
    return value if isinstance(value, int) else tuple(int(v) for v in value)
