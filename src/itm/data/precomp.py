"""The public "precomp" layout (SCAN's release), read as it is, and its DataModule.

A precomp directory holds, per split (``train``, ``dev``, ``test``, ``testall``):

- ``<split>_ims.npy``: float [N, K, D] region features (36 x 2048 in the public data),
  memory-mapped, never loaded whole (COCO train is ~33 GB);
- ``<split>_caps.txt``: UTF-8 captions, one per line, ``N * c`` lines, caption ``j`` belonging to
  image ``j // c`` (``c`` = 5 in Flickr30K / COCO; any whole multiple works);
- optional ``<split>_ids.txt`` (one image id per line) and ``<split>_boxes.npy`` [N, K, 4];
- optional ``<split>_positions.npy`` [N, K, 2T (+1)]: PFAN position rows (block indices, overlap
  weights, optional area; :mod:`itm.data.pfan`), written by ``itm-prepare pfan-positions DIR``
  from the boxes and ``<split>_img_sizes.npy``. The PFAN authors' released files are named
  ``<split>_boxes.npy`` but hold such rows (30 columns for Flickr30K, 31 for COCO): a boxes file
  of that width is read as positions, with a message;

plus a SCAN ``*_vocab.json`` (in the directory, or ``<dir>/../vocab/<dir name>_vocab.json`` as
in SCAN's repository). :class:`PrecompDataModule` also reads the project's HDF5 store
(``<split>.h5`` written by ``itm-prepare h5``, see :mod:`itm.data.h5store`).

Every split is validated when first loaded and all the splits a run needs are loaded before
training: a :class:`~itm.data.validation.DataError` names the file and the problem.
"""

from __future__ import annotations

import logging
import mmap
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itm.data.datamodule import SPLITS, ITMDataModule
from itm.data.pfan import POSITION_WIDTHS
from itm.data.validation import (
    DataError,
    DataWarning,
    NpyInfo,
    captions_per_image,
    check_finite_rows,
    first_lines,
    read_npy_header,
    read_text_lines,
)
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


def image_index(idx: int | np.integer, n: int) -> int:
    """``idx`` as a non-negative row of ``n`` images (negative counts from the end);
    ``IndexError`` naming both when out of range."""
    i = int(idx)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"image index {idx} out of range for {n} images")
    return i


class NpyImages:
    """A read-only, memory-mapped view of the first ``limit`` rows of a ``.npy`` array.

    Array-like: ``shape``, ``dtype``, ``len()``, ``x[i]`` / ``x[i:j]`` (views of the map; copy what
    you keep). The map is opened lazily in each process (after a fork the child opens its own),
    and pickling carries only the path, so the object travels to DataLoader workers and
    ``ddp_spawn`` processes at no cost.

    Mapped pages count towards the process's resident set size even though they are only page
    cache; every ``release_bytes`` of reads the mapping is told ``MADV_DONTNEED`` (the pages stay
    in the page cache, the process stops holding them), so iterating a file far larger than
    memory keeps the RSS bounded.

    Args:
        path: the ``.npy`` file.
        limit: expose only the first ``limit`` rows (``None``: all).
        info: its header (read and checked when omitted).
        release_bytes: bytes read between two releases of the mapped pages.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        limit: int | None = None,
        info: NpyInfo | None = None,
        release_bytes: int = 256 << 20,
    ) -> None:
        self.path = Path(path)
        self.info = info if info is not None else read_npy_header(self.path)
        n = self.info.shape[0]
        self.n = n if limit is None else max(0, min(int(limit), n))
        self.release_bytes = int(release_bytes)
        self._row_bytes = int(np.prod(self.info.shape[1:])) * self.info.dtype.itemsize
        self._mm: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self._pid = -1
        self._since_release = 0

    # ---- array-like ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.info.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.info.dtype

    @property
    def ndim(self) -> int:
        return len(self.info.shape)

    def __len__(self) -> int:
        return self.n

    def _arr(self) -> np.ndarray:
        if self._array is None or self._pid != os.getpid():
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._array = np.ndarray(
                self.info.shape,
                dtype=self.info.dtype,
                buffer=self._mm,
                offset=self.info.offset,
                order="F" if self.info.fortran_order else "C",
            )
            self._pid = os.getpid()
            self._since_release = 0
        return self._array

    def __getitem__(self, idx: Any) -> np.ndarray:
        arr = self._arr()
        if isinstance(idx, (int, np.integer)):
            self._account(1)
            out = arr[image_index(idx, self.n)]
        elif isinstance(idx, slice):
            start, stop, step = idx.indices(self.n)
            out = arr[start:stop:step]
            self._account(len(out))
        else:
            raise TypeError(f"NpyImages supports int and slice indices, got {type(idx).__name__}")
        return out

    def _account(self, rows: int) -> None:
        self._since_release += rows * self._row_bytes
        if self._since_release >= self.release_bytes:
            self.release()

    def release(self) -> None:
        """Drop this process's mapped pages (they stay in the page cache; views stay valid: a
        later read faults the page in again)."""
        if self._mm is not None and self._pid == os.getpid() and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED)
        self._since_release = 0

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.array(self[:], dtype=dtype)

    # ---- pickling -----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_mm=None, _array=None, _pid=-1, _since_release=0)
        return state

    def __repr__(self) -> str:
        return f"NpyImages({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


@dataclass
class FeatureSplit:
    """One loaded, validated split (a feature store for :mod:`itm.data.datamodule`).

    Attributes:
        name: split name.
        images: array-like [N, K, D] (:class:`NpyImages` or :class:`~itm.data.h5store.H5Images`).
        captions: N_cap caption strings.
        cap_to_img: int64 [N_cap] image index of each caption.
        images_file: the file holding the features (for messages).
        captions_file: the file holding the captions (for messages).
        ids: per-image ids (``<split>_ids.txt``) or ``None``.
        boxes: array-like [N, K, 4] region boxes or ``None``.
        format: ``"npy"`` or ``"h5"``.
        positions: array-like [N, K, W] PFAN position rows (``W`` = 30 or 31 for the
            authors' release) or ``None``; served to an image encoder that asks for them.
        positions_file: the file holding the positions (for messages).
    """

    name: str
    images: Any
    captions: list[str]
    cap_to_img: np.ndarray
    images_file: Path
    captions_file: Path
    ids: list[str] | None = None
    boxes: Any = None
    format: str = "npy"
    meta: dict[str, Any] = field(default_factory=dict)
    positions: Any = None
    positions_file: Path | None = None

    @property
    def n_regions(self) -> int:
        return int(self.images.shape[1])

    @property
    def img_dim(self) -> int:
        return int(self.images.shape[2])

    def summary(self) -> dict[str, Any]:
        counts = np.bincount(self.cap_to_img, minlength=len(self.images))
        cpi = (
            str(int(counts[0]))
            if (counts == counts[0]).all()
            else f"{int(counts.min())}-{int(counts.max())}"
        )
        return {
            "split": self.name,
            "format": self.format,
            "images": len(self.images),
            "captions": len(self.captions),
            "caps/img": cpi,
            "regions": self.n_regions,
            "dim": self.img_dim,
            "dtype": str(self.images.dtype),
            "file": str(self.images_file),
        }


def split_files(root: str | os.PathLike[str], split: str) -> dict[str, Path]:
    """Paths of a split's files in the precomp layout (whether they exist or not)."""
    root = Path(root)
    return {
        "images": root / f"{split}_ims.npy",
        "captions": root / f"{split}_caps.txt",
        "ids": root / f"{split}_ids.txt",
        "boxes": root / f"{split}_boxes.npy",
        "positions": root / f"{split}_positions.npy",
        "img_sizes": root / f"{split}_img_sizes.npy",
    }


def _check_split_name(split: str, where: str | os.PathLike[str]) -> None:
    if split not in SPLITS:
        raise DataError(where, f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def open_npy_split(
    root: str | os.PathLike[str],
    split: str,
    limit: int | None = None,
    check_finite: bool = True,
) -> FeatureSplit:
    """Open and validate a split of a precomp directory (features stay on disk).

    Args:
        root: the precomp directory.
        split: one of ``train dev test testall``.
        limit: keep only the first ``limit`` images and their captions (``None``: all).
        check_finite: scan the (kept) features for NaN / inf in bounded chunks.

    Raises:
        DataError: naming the file and the problem (missing file, wrong rank or dtype,
            truncated file, NaN/inf, caption count not a multiple of the image count, empty
            caption, non-UTF-8 text, ids or boxes not matching the images).
    """
    _check_split_name(split, root)
    files = split_files(root, split)
    if not files["images"].is_file() or not files["captions"].is_file():
        missing = files["images"] if not files["images"].is_file() else files["captions"]
        present = sorted(p.name for p in Path(root).glob("*_ims.npy")) + sorted(
            p.name for p in Path(root).glob("*.h5")
        )
        raise DataError(
            missing,
            f"file not found (split {split!r} of the precomp layout needs {split}_ims.npy and "
            f"{split}_caps.txt; {root} has: {', '.join(present) or 'no feature files'})",
        )
    info = read_npy_header(files["images"], ndim=3)
    n_all = info.shape[0]
    captions = read_text_lines(files["captions"], "caption")
    cpi = captions_per_image(len(captions), n_all, files["captions"], files["images"])
    images = NpyImages(files["images"], limit=limit, info=info)
    n = len(images)
    captions = captions[: n * cpi]
    cap_to_img = np.repeat(np.arange(n, dtype=np.int64), cpi)

    ids = None
    if files["ids"].is_file():
        ids = read_text_lines(files["ids"], "image id")
        if len(ids) != n_all:
            raise DataError(
                files["ids"], f"{len(ids)} ids for {n_all} images in {files['images'].name}"
            )
        ids = ids[:n]
    boxes, positions, positions_file = None, None, None
    if files["boxes"].is_file():
        binfo = _region_file_header(files["boxes"], info, files["images"])
        if binfo.shape[2] == 4:
            boxes = NpyImages(files["boxes"], limit=limit, info=binfo)
        else:  # the PFAN authors' release: positions under the name of boxes
            positions, positions_file = (
                NpyImages(files["boxes"], limit=limit, info=binfo),
                files["boxes"],
            )
            msg = (
                f"{binfo.shape[2]} columns per region: PFAN position rows (the authors' "
                "release), not boxes (x1, y1, x2, y2); reading it as positions. Its rows follow "
                f"the authors' image order, which must match {files['images'].name} (match them "
                "by ids or captions)"
            )
            warnings.warn(f"{files['boxes']}: {msg}", DataWarning, stacklevel=2)
            log.warning("%s: %s", files["boxes"], msg)
    if files["positions"].is_file():
        positions, positions_file = (
            open_positions(
                files["positions"], (info.shape[0], info.shape[1]), files["images"], limit
            ),
            files["positions"],
        )
    if check_finite:
        check_finite_rows(images, files["images"], n)
        images.release()
    return FeatureSplit(
        name=split,
        images=images,
        captions=captions,
        cap_to_img=cap_to_img,
        images_file=files["images"],
        captions_file=files["captions"],
        ids=ids,
        boxes=boxes,
        format="npy",
        meta={"captions_per_image": cpi, "n_images_on_disk": n_all},
        positions=positions,
        positions_file=positions_file,
    )


def _region_file_header(path: Path, info: NpyInfo, images_file: Path) -> NpyInfo:
    """Header of a per-region file ``[N, K, W]`` (boxes or positions), checked against the
    features' ``[N, K]``; ``W`` must be 4 (boxes) or 30 / 31 (PFAN positions)."""
    binfo = read_npy_header(path, ndim=3)
    width = binfo.shape[2]
    if binfo.shape[:2] != info.shape[:2] or width not in (4, *POSITION_WIDTHS):
        raise DataError(
            path,
            f"shape {binfo.shape}; expected [{info.shape[0]}, {info.shape[1]}, 4] (boxes x1, y1, "
            f"x2, y2) or [{info.shape[0]}, {info.shape[1]}, 30 | 31] (PFAN positions) to match "
            f"{images_file.name}",
        )
    return binfo


def open_positions(
    path: Path, shape: tuple[int, int], images_file: Path, limit: int | None = None
) -> NpyImages:
    """Open ``<split>_positions.npy`` [N, K, W >= 2] matching the features' ``shape = (N, K)``
    (as stored on disk, before any ``limit``)."""
    pinfo = read_npy_header(path, ndim=3)
    if pinfo.shape[:2] != tuple(shape) or pinfo.shape[2] < 2:
        raise DataError(
            path,
            f"positions have shape {pinfo.shape}; expected [{shape[0]}, {shape[1]}, 2T or 2T + 1] "
            f"(T block indices, T weights, optional area) to match {images_file.name}",
        )
    return NpyImages(path, limit=limit, info=pinfo)


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
        _check_split_name(test_split, self.root)
        self.format = format
        self.vocab_path = Path(os.path.expanduser(str(vocab_path))) if vocab_path else None
        self.limits = {"train": n_train, "dev": n_dev, "test": n_test, "testall": n_test}
        self.test_split = test_split
        wanted = list(splits) if splits else ["train", "dev", test_split]
        for s in wanted:
            _check_split_name(s, self.root)
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
        _check_split_name(split, self.root)
        limit = self.limits.get(split)
        limit = None if limit is None or int(limit) <= 0 else int(limit)
        if self.split_format(split) == "h5":
            from itm.data.h5store import open_h5_split

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
