"""The DataModule of Flickr30K / COCO (or any data) on disk: :class:`PrecompDataModule` reads
the public "precomp" layout (:mod:`itm.data.stores.npy`) or the project's HDF5 store
(``<split>.h5`` written by ``itm-prepare h5``, :mod:`itm.data.stores.hdf5`), with a SCAN
``*_vocab.json`` (in the directory, or ``<dir>/../vocab/<dir name>_vocab.json`` as in SCAN's
repository; :func:`find_vocab`).

Every split is validated when first loaded and all the splits a run needs are loaded before
training: a :class:`~itm.data.validation.DataError` names the file and the problem.
:class:`FeatureSplit`, :class:`NpyImages`, :func:`open_npy_split` and :func:`split_files` are
re-exported from :mod:`itm.data.stores`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from itm.data.datamodule import ITMDataModule
from itm.data.splits import SPLITS
from itm.data.stores.base import FeatureSplit
from itm.data.stores.npy import (
    NpyImages,
    check_split_name,
    open_npy_split,
    open_positions,
    split_files,
)
from itm.data.validation import DataError, DataWarning, first_lines
from itm.data.vocab import UNK_ID, Vocabulary, tokenize

__all__ = [
    "FeatureSplit",
    "NpyImages",
    "PrecompDataModule",
    "find_vocab",
    "open_npy_split",
    "split_files",
]

log = logging.getLogger(__name__)

FORMATS = ("auto", "npy", "h5")
UNKNOWN_POLICIES = ("warn", "error", "ignore")


def find_vocab(root: str | os.PathLike[str]) -> Path:
    """The SCAN vocabulary of a data directory.

    Looks for ``<root>/*_vocab.json`` (exactly one), then SCAN's repository layout
    ``<root>/../vocab/<root name>_vocab.json``.

    Raises:
        DataError: naming ``root`` when none (or several) is found, with what to do.
    """
    root = Path(root)
    found = sorted(root.glob("*_vocab.json"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise DataError(
            root,
            f"several vocabularies ({', '.join(p.name for p in found)}); choose one with "
            f"data.vocab_path=FILE",
        )
    scan_layout = root.resolve().parent / "vocab" / f"{root.resolve().name}_vocab.json"
    if scan_layout.is_file():
        return scan_layout
    raise DataError(
        root,
        f"vocabulary missing: no *_vocab.json in this directory (nor {scan_layout}); pass "
        f"data.vocab_path=FILE (a SCAN *_vocab.json) or build one with `itm-prepare vocab {root}`",
    )


class PrecompDataModule(ITMDataModule):
    """Flickr30K / COCO (or any data) in the precomp layout or the project's HDF5 store.

    ``img_dim`` and ``n_regions`` come from the data. All the splits a run needs (``splits``)
    are loaded and validated together on first use (``img_dim``, ``vocab_size``, ``setup``...),
    so bad data fails before any training, with a :class:`~itm.data.validation.DataError`
    naming the file. Features stay on disk (memory map or HDF5, opened lazily in each process);
    pickling keeps only paths and captions.

    Args:
        root: the data directory (``<split>_ims.npy`` + ``<split>_caps.txt``, or ``<split>.h5``).
        format: ``npy`` (precomp layout), ``h5`` (``<split>.h5``), or ``auto`` (a split's
            ``.h5`` when present, else its ``.npy``).
        vocab_path: the SCAN ``*_vocab.json``; default: found next to the data (see
            :func:`find_vocab`). Not needed with a BERT tokenizer.
        n_train, n_dev, n_test: use only the first N images (and their captions) of train / dev /
            test and testall; ``None`` keeps all. ``n_dev`` defaults to 1000 (the SCAN
            convention: the first 1000 dev images / 5000 captions).
        test_split: the split of ``test_dataloader`` (``test`` or ``testall`` for COCO 5K).
        splits: the splits to validate up front; default ``train``, ``dev`` and ``test_split``.
        check_finite: scan features for NaN / inf (chunked; an HDF5 store checked when written
            is not scanned again).
        unknown_captions: what to do with captions whose every word is missing from the word
            vocabulary: ``warn`` (default; a :class:`~itm.data.validation.DataWarning` naming the
            file and lines), ``error``, or ``ignore``. In any mode but ``ignore``, a vocabulary
            that misses more than half of a split's word tokens is an error (wrong vocabulary).
        batch_size, eval_batch_size, num_workers, pin_memory: see :class:`ITMDataModule`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        format: str = "auto",
        vocab_path: str | os.PathLike[str] | None = None,
        n_train: int | None = None,
        n_dev: int | None = 1000,
        n_test: int | None = None,
        test_split: str = "test",
        splits: list[str] | tuple[str, ...] | None = None,
        check_finite: bool = True,
        unknown_captions: str = "warn",
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        self.save_hyperparameters()
        if root in (None, "", "???"):
            raise DataError(
                "data.root", "not set: pass data.root=DIR (a directory in the precomp layout)"
            )
        self.root = Path(os.path.expanduser(str(root)))
        if not self.root.is_dir():
            raise DataError(
                self.root,
                "data directory does not exist (set data.root=DIR; the data=f30k / data=coco "
                "presets read $ITM_F30K_DIR / $ITM_COCO_DIR, else $ITM_DATA_DIR/f30k_precomp "
                "/ coco_precomp)",
            )
        if format not in FORMATS:
            raise DataError(self.root, f"data.format={format!r}; expected one of {FORMATS}")
        if unknown_captions not in UNKNOWN_POLICIES:
            raise DataError(
                self.root,
                f"data.unknown_captions={unknown_captions!r}; expected one of {UNKNOWN_POLICIES}",
            )
        check_split_name(test_split, self.root)
        self.format = format
        self.vocab_path = Path(os.path.expanduser(str(vocab_path))) if vocab_path else None
        self.limits = {"train": n_train, "dev": n_dev, "test": n_test, "testall": n_test}
        self.test_split = test_split
        wanted = list(splits) if splits else ["train", "dev", test_split]
        for s in wanted:
            check_split_name(s, self.root)
        self.splits = list(dict.fromkeys(wanted))
        self.check_finite = bool(check_finite)
        self.unknown_captions = unknown_captions
        self._validated = False
        self._validating = False
        self._checked_tokenizer: int | None = None

    # ---- loading ------------------------------------------------------------------------------
    def split_format(self, split: str) -> str:
        """``npy`` or ``h5``: how ``split`` is stored under :attr:`root`."""
        if self.format != "auto":
            return self.format
        return "h5" if (self.root / f"{split}.h5").is_file() else "npy"

    def load_split(self, split: str) -> FeatureSplit:
        """Open and validate ``split`` (see :func:`open_npy_split`, :func:`open_h5_split`)."""
        check_split_name(split, self.root)
        limit = self.limits.get(split)
        limit = None if limit is None or int(limit) <= 0 else int(limit)
        if self.split_format(split) == "h5":
            from itm.data.stores.hdf5 import open_h5_split

            store = open_h5_split(self.root / f"{split}.h5", limit, self.check_finite, split)
            pos_file = split_files(self.root, split)["positions"]
            if store.positions is None and pos_file.is_file():
                on_disk = (
                    int(store.meta.get("n_images_on_disk", len(store.images))),
                    store.n_regions,
                )
                store.positions = open_positions(pos_file, on_disk, store.images_file, limit)
                store.positions_file = pos_file
        else:
            store = open_npy_split(self.root, split, limit, self.check_finite)
        self._check_consistent(store)
        return store

    def _check_consistent(self, store: FeatureSplit) -> None:
        """Every split has the same region count and feature size."""
        for other in self._splits.values():
            if not isinstance(other, FeatureSplit) or other is store:
                continue
            for what, a, b in (
                ("region count", other.n_regions, store.n_regions),
                ("feature dimension", other.img_dim, store.img_dim),
            ):
                if a != b:
                    raise DataError(
                        store.images_file,
                        f"{what} differs between splits: {store.images_file.name} has {b}, "
                        f"{other.images_file.name} has {a} (features {store.images.shape[1:]} "
                        f"vs {other.images.shape[1:]}); all splits must come from the same "
                        f"feature extractor",
                    )

    def get_split(self, split: str) -> FeatureSplit:
        if split not in SPLITS:
            raise DataError(
                self.root, f"unknown split {split!r}; expected one of {', '.join(SPLITS)}"
            )
        self._ensure_validated()
        return super().get_split(split)  # type: ignore[return-value]

    def load_vocab(self) -> Vocabulary:
        """The SCAN vocabulary at ``vocab_path`` or found next to the data."""
        path = self.vocab_path if self.vocab_path is not None else find_vocab(self.root)
        if not path.exists():
            raise DataError(path, "vocabulary missing: file not found (data.vocab_path)")
        vocab = Vocabulary.from_json(path)  # ValueError naming the file on any problem
        vocab.path = str(path)  # type: ignore[attr-defined]
        return vocab

    # ---- validation ---------------------------------------------------------------------------
    def _ensure_validated(self) -> None:
        if not self._validated and not self._validating:
            self.validate()

    def validate(self) -> None:
        """Load and check every split of :attr:`splits`, their consistency, the vocabulary (or
        tokenizer) and the captions against it. Idempotent; raises
        :class:`~itm.data.validation.DataError` naming the file on the first problem."""
        if self._validated:
            self._check_captions()
            return
        self._validating = True
        try:
            for split in self.splits:
                super().get_split(split)
            self._check_captions()
            self._validated = True
        finally:
            self._validating = False

    def _check_captions(self) -> None:
        """Captions against the current caption tokenizer (once per tokenizer)."""
        tok = self.caption_tokenizer
        if self._checked_tokenizer == id(tok):
            return
        if isinstance(tok, Vocabulary) and self.unknown_captions != "ignore":
            for split in self.splits:
                self._check_unknown(self._splits[split], tok)  # type: ignore[arg-type]
        self._checked_tokenizer = id(tok)

    def _check_unknown(self, store: FeatureSplit, vocab: Vocabulary) -> None:
        w2i = vocab.word2idx
        all_unknown: list[int] = []
        n_tokens = n_unknown = 0
        for i, caption in enumerate(store.captions):
            toks = tokenize(caption)
            unk = sum(1 for t in toks if w2i.get(t, UNK_ID) == UNK_ID)
            n_tokens += len(toks)
            n_unknown += unk
            if unk == len(toks):
                all_unknown.append(i)
        vocab_file = getattr(vocab, "path", "the vocabulary")
        if n_tokens and n_unknown > 0.5 * n_tokens:
            raise DataError(
                store.captions_file,
                f"{100 * n_unknown / n_tokens:.0f}% of the caption words are missing from the "
                f"vocabulary {vocab_file}: it does not belong to this data (set data.vocab_path "
                f"or build one with `itm-prepare vocab {self.root}`)",
            )
        if all_unknown:
            i = all_unknown[0]
            msg = (
                f"{len(all_unknown)} caption(s) consist only of words missing from the vocabulary "
                f"{vocab_file} ({first_lines(all_unknown)}; e.g. {store.captions[i]!r}); they "
                f"encode to <start> <unk>... <end>"
            )
            if self.unknown_captions == "error":
                raise DataError(store.captions_file, msg)
            warnings.warn(f"{store.captions_file}: {msg}", DataWarning, stacklevel=2)
            log.warning("%s: %s", store.captions_file, msg)

    # ---- sizes from the data -------------------------------------------------------------------
    @property
    def img_dim(self) -> int:
        """Region feature size D, from the data."""
        return self.get_split(self.splits[0]).img_dim

    @property
    def n_regions(self) -> int:
        """Regions per image K, from the data."""
        return self.get_split(self.splits[0]).n_regions

    # ---- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Validate everything (once), whatever the stage, and that every split holds the
        per-region inputs the image encoder asks for (:attr:`image_inputs`)."""
        self.validate()
        for split in self.splits:
            self._image_inputs_of(split)

    def test_dataloader(self):  # noqa: D401 - Lightning hook
        """``[image_loader, caption_loader]`` over :attr:`test_split`."""
        return self.eval_dataloaders(self.test_split)

    # ---- pickling -----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # Splits are cheap to pickle (paths + captions); keep them so that spawned processes do
        # not validate again.
        return self.__dict__.copy()
