"""Bad input data is rejected before training with a message naming the file and the problem
(one test per case; each asserts the message text)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import run_train_cli
from itm.data import DataError, DataWarning, PrecompDataModule, Vocabulary
from itm.data.prepare import main as prepare
from precomp_utils import write_precomp

SIZES = {"train": 6, "dev": 4, "test": 4}


@pytest.fixture
def root(tmp_path) -> Path:
    return write_precomp(tmp_path / "tiny_precomp", SIZES, n_regions=4, img_dim=2048)


def validate(root: Path, **kw) -> PrecompDataModule:
    dm = PrecompDataModule(root, **kw)
    dm.validate()
    return dm


def raises(root: Path, file: str, message: str, **kw) -> DataError:
    """``validate`` fails with a DataError naming ``root/file`` and containing ``message``."""
    with pytest.raises(DataError) as err:
        validate(root, **kw)
    text = str(err.value)
    assert text.startswith(str(root / file) + ": "), text
    assert message in text, text
    return err.value


def set_caption(root: Path, split: str, line: int, text: str) -> None:
    path = root / f"{split}_caps.txt"
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


# ---- the precomp layout -----------------------------------------------------------------------


def test_valid_data_passes(root):
    dm = validate(root)
    assert dm.img_dim == 2048 and dm.n_regions == 4


def test_missing_feature_file(root):
    (root / "dev_ims.npy").unlink()
    raises(root, "dev_ims.npy", "file not found (split 'dev' of the precomp layout needs")


def test_missing_caption_file(root):
    (root / "test_caps.txt").unlink()
    raises(root, "test_caps.txt", "file not found")


def test_feature_array_of_wrong_rank(root):
    np.save(root / "train_ims.npy", np.zeros((6, 4 * 2048), np.float32))
    raises(root, "train_ims.npy", "feature array has shape (6, 8192) (rank 2); expected rank 3")


def test_nan_features(root):
    ims = np.load(root / "train_ims.npy")
    ims[4, 2, 7] = np.nan
    np.save(root / "train_ims.npy", ims)
    raises(root, "train_ims.npy", "non-finite features: image 4 has 1 NaN and 0 inf values")


def test_inf_features(root):
    ims = np.load(root / "dev_ims.npy")
    ims[1, 0, :3] = np.inf
    np.save(root / "dev_ims.npy", ims)
    raises(root, "dev_ims.npy", "non-finite features: image 1 has 0 NaN and 3 inf values")


def test_caption_count_not_a_multiple_of_the_image_count(root):
    with open(root / "train_caps.txt", "a") as f:
        f.write("one caption too many\n")
    raises(
        root,
        "train_caps.txt",
        "31 captions for 6 images in train_ims.npy: the caption count must be a multiple",
    )


def test_empty_caption(root):
    set_caption(root, "dev", 7, "   ")
    raises(root, "dev_caps.txt", "empty caption on line 7")


def test_unknown_split(root):
    with pytest.raises(DataError, match=re.escape(f"{root}: unknown split 'val'; expected one of")):
        PrecompDataModule(root, test_split="val")
    dm = PrecompDataModule(root)
    with pytest.raises(DataError, match="unknown split 'validation'; expected one of train, dev"):
        dm.get_split("validation")


def test_vocabulary_missing(root):
    (root / "tiny_precomp_vocab.json").unlink()
    raises(root, ".", "vocabulary missing: no *_vocab.json in this directory")
    with pytest.raises(DataError, match="nope_vocab.json: vocabulary missing: file not found"):
        validate(root, vocab_path=root / "nope_vocab.json")


def test_vocabulary_unreadable(root):
    os.mkdir(root / "dir_vocab.json")
    (root / "tiny_precomp_vocab.json").unlink()
    with pytest.raises(ValueError, match=r"dir_vocab.json'?: cannot be read"):
        validate(root, vocab_path=root / "dir_vocab.json")


def test_malformed_vocab_json(root):
    (root / "tiny_precomp_vocab.json").write_text('{"word2idx": {"<pad>": 0,')
    with pytest.raises(ValueError) as err:
        validate(root)
    assert "tiny_precomp_vocab.json" in str(err.value)
    assert "not valid JSON" in str(err.value)


def test_token_ids_past_the_vocabulary_size(root):
    path = root / "tiny_precomp_vocab.json"
    data = json.loads(path.read_text())
    data["word2idx"][
        next(iter(data["word2idx"].keys() - {"<pad>", "<start>", "<end>", "<unk>"}))
    ] = 99
    data.pop("idx2word")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        validate(root)
    text = str(err.value)
    assert "tiny_precomp_vocab.json" in text
    assert (
        "token id 99 (word " in text
        and f"is past the vocabulary size {len(data['word2idx'])}" in text
    )


def test_bert_vocab_larger_than_the_model_embedding(tmp_path, tiny_bert):
    import shutil

    from itm.data.tokenizers import BertCaptionTokenizer

    bert = tmp_path / "bert"
    shutil.copytree(tiny_bert, bert)
    config = json.loads((bert / "config.json").read_text())
    n_vocab = len((bert / "vocab.txt").read_text().splitlines())
    config["vocab_size"] = n_vocab - 5
    (bert / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        BertCaptionTokenizer(bert)
    text = str(err.value)
    assert "vocab.txt" in text and f"has vocab_size {n_vocab - 5}" in text
    assert "would be past the embedding table" in text


def test_region_count_differs_between_splits(root):
    write_precomp(root, {"dev": 4}, n_regions=3, img_dim=2048, vocab=False)
    raises(
        root,
        "dev_ims.npy",
        "region count differs between splits: dev_ims.npy has 3, train_ims.npy has 4",
    )


def test_feature_dimension_differs_between_splits(root):
    write_precomp(root, {"test": 4}, n_regions=4, img_dim=1024, vocab=False)
    raises(
        root,
        "test_ims.npy",
        "feature dimension differs between splits: test_ims.npy has 1024, train_ims.npy has 2048",
    )


def test_truncated_npy(root):
    path = root / "train_ims.npy"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    raises(
        root,
        "train_ims.npy",
        "truncated .npy file: the header promises shape (6, 4, 2048) float32 (196,608 bytes",
    )


def test_not_an_npy_file(root):
    (root / "test_ims.npy").write_bytes(b"PK\x03\x04 a zip, not an array")
    raises(root, "test_ims.npy", "not a readable .npy file")


def test_non_utf8_caption_file(root):
    path = root / "train_caps.txt"
    lines = path.read_bytes().split(b"\n")
    lines[2] = "un caf\u00e9 cr\u00e8me".encode("latin-1")
    path.write_bytes(b"\n".join(lines))
    raises(root, "train_caps.txt", "not valid UTF-8: byte 0xe9 on line 3 cannot be decoded")


def test_caption_of_only_unknown_words_warns_by_default(root):
    """Policy: warn (the caption encodes to <start> <unk>... <end> and is kept); `error` rejects."""
    set_caption(root, "train", 3, "Qwxz plorf!")
    with pytest.warns(DataWarning) as rec:
        validate(root)
    text = str(rec[0].message)
    assert text.startswith(str(root / "train_caps.txt") + ": 1 caption(s) consist only of words")
    assert "(line 3; e.g. 'Qwxz plorf!')" in text
    raises(root, "train_caps.txt", "1 caption(s) consist only of words", unknown_captions="error")


def test_vocabulary_of_other_data_is_rejected(root):
    Vocabulary(["zebra", "giraffe"]).to_json(root / "tiny_precomp_vocab.json")
    raises(root, "train_caps.txt", "of the caption words are missing from the vocabulary")


# ---- the HDF5 store ---------------------------------------------------------------------------


@pytest.fixture
def h5root(root, tmp_path) -> Path:
    assert prepare(["h5", str(root), "--out", str(tmp_path / "h5")]) == 0
    return tmp_path / "h5"


def test_corrupt_hdf5_garbage(h5root):
    (h5root / "dev.h5").write_bytes(os.urandom(4096))
    raises(h5root, "dev.h5", "corrupt or not an HDF5 file (", format="h5")


def test_corrupt_hdf5_truncated(h5root):
    path = h5root / "train.h5"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    raises(h5root, "train.h5", "corrupt or not an HDF5 file (", format="h5")


def test_corrupt_hdf5_missing_dataset(h5root):
    with h5py.File(h5root / "test.h5", "a") as f:
        del f["cap_to_img"]
    raises(
        h5root, "test.h5", "corrupt itm HDF5 store: dataset 'cap_to_img' is missing", format="h5"
    )


def test_hdf5_not_written_by_itm(h5root):
    with h5py.File(h5root / "test.h5", "w") as f:
        f["images"] = np.zeros((2, 3, 4), np.float32)
    raises(h5root, "test.h5", "not an itm HDF5 store", format="h5")


def test_conversion_rejects_nan_and_leaves_nothing_behind(root, tmp_path, capsys):
    ims = np.load(root / "test_ims.npy")
    ims[2, 1, 0] = np.nan
    np.save(root / "test_ims.npy", ims)
    out = tmp_path / "out"
    assert prepare(["h5", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'test_ims.npy'}: non-finite features: image 2 has 1 NaN" in err
    assert sorted(p.name for p in out.iterdir()) == ["dev.h5", "train.h5"]  # no test.h5, no tmp


# ---- before any training ----------------------------------------------------------------------


def test_train_cli_fails_before_training(root, tmp_path):
    ims = np.load(root / "test_ims.npy")
    ims[0, 0, 0] = np.inf
    np.save(root / "test_ims.npy", ims)
    proc = run_train_cli(
        ["data=precomp", f"data.root={root}", "debug=fast"],
        tmp_path,
        log_dir=tmp_path / "logs",
        check=False,
    )
    assert proc.returncode != 0
    assert (
        f"{root / 'test_ims.npy'}: non-finite features: image 0 has 0 NaN and 1 inf" in proc.stderr
    )
    assert not list((tmp_path / "logs").glob("**/*.ckpt"))
    assert "Epoch" not in proc.stdout + proc.stderr
