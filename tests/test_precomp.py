"""Real-data layouts: the public precomp layout (memory-mapped npy), the project's HDF5 store,
vocabularies, and training / scoring through both (tiny datasets with 2048-d features)."""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_train_cli
from itm.data import (
    NpyImages,
    PrecompDataModule,
    Vocabulary,
    collate_images,
    tokenize,
)
from itm.data.h5store import H5Images, write_h5
from itm.data.prepare import main as prepare
from precomp_utils import tiny_split, write_precomp

# HF tokenizers' thread pool (the tiny BERT fixture) makes forked loader workers linger at exit.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAST = [
    "debug=fast",
    "model.embed_size=32",
    "model.text_encoder.word_dim=16",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """One tiny dataset as precomp npy, HDF5 float32 and HDF5 float16 directories."""
    base = tmp_path_factory.mktemp("stores")
    npy = write_precomp(base / "tiny_precomp", ids=True, boxes=True)
    assert prepare(["h5", str(npy), "--out", str(base / "h5_f32")]) == 0
    assert prepare(["h5", str(npy), "--out", str(base / "h5_f16"), "--float16"]) == 0
    return {"npy": npy, "h5": base / "h5_f32", "h5_f16": base / "h5_f16"}


@pytest.fixture(scope="module")
def trained_on_npy(stores, tmp_path_factory) -> Path:
    """`python train.py data=precomp data.root=...` once; its best checkpoint."""
    logs = tmp_path_factory.mktemp("logs_npy")
    proc = run_train_cli(["data=precomp", f"data.root={stores['npy']}", *FAST], logs)
    assert "rsum" in proc.stdout
    ckpts = list(logs.glob("train/runs/*/checkpoints/best.ckpt"))
    assert len(ckpts) == 1
    with open(next(logs.glob("train/runs/*/csv/metrics.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["test/rsum"]) for r in rows if r.get("test/rsum")]
    return ckpts[0]


# ---- the precomp layout -----------------------------------------------------------------------


def test_precomp_layout_is_read_as_it_is(stores):
    dm = PrecompDataModule(stores["npy"])
    assert (dm.img_dim, dm.n_regions) == (2048, 6)  # from the data
    vocab = Vocabulary.from_json(stores["npy"] / "tiny_precomp_vocab.json")
    assert dm.vocab == vocab and dm.vocab_size == len(vocab)
    dm.setup("fit")
    train = dm.get_split("train")
    assert isinstance(train.images, NpyImages) and train.format == "npy"
    assert len(train.images) == 24 and len(train.captions) == 120
    assert train.cap_to_img.tolist() == np.repeat(np.arange(24), 5).tolist()
    assert train.ids[:2] == ["1000", "1001"] and train.boxes.shape == (24, 6, 4)
    on_disk = np.load(stores["npy"] / "train_ims.npy")
    assert np.array_equal(train.images[3], on_disk[3])
    text = (stores["npy"] / "train_caps.txt").read_text().splitlines()
    assert train.captions == text
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[1:] == (6, 2048) and batch["images"].dtype == torch.float32
    # <start> and <end> are counted in the caption lengths
    i = int(batch["cap_ids"][0])
    assert int(batch["cap_lens"][0]) == len(tokenize(train.captions[i])) + 2


def test_dev_split_truncated_to_first_1000_images_by_default(tmp_path):
    root = write_precomp(tmp_path, {"train": 4, "dev": 1003, "test": 2}, n_regions=3, img_dim=4)
    dm = PrecompDataModule(root)
    dev = dm.get_split("dev")
    assert len(dev.images) == 1000 and len(dev.captions) == 5000
    assert dev.cap_to_img.max() == 999
    assert np.array_equal(dev.images[999], np.load(root / "dev_ims.npy")[999])
    dm_all = PrecompDataModule(root, n_dev=None, n_train=2)
    assert len(dm_all.get_split("dev").images) == 1003
    assert len(dm_all.get_split("train").captions) == 10  # debug-style cap on train too
    # the same truncation from the HDF5 store
    assert prepare(["h5", str(root), "--out", str(tmp_path / "h5")]) == 0
    h5dev = PrecompDataModule(tmp_path / "h5").get_split("dev")
    assert len(h5dev.images) == 1000 and len(h5dev.captions) == 5000
    assert h5dev.captions == dev.captions


def test_vocab_found_in_scan_repository_layout(tmp_path):
    root = write_precomp(tmp_path / "data" / "f30k_precomp", {"train": 3, "dev": 2, "test": 2})
    (tmp_path / "data" / "vocab").mkdir()
    os.replace(
        root / "tiny_precomp_vocab.json", tmp_path / "data" / "vocab" / "f30k_precomp_vocab.json"
    )
    dm = PrecompDataModule(root)
    assert dm.vocab.path.endswith("vocab/f30k_precomp_vocab.json")
    explicit = PrecompDataModule(
        root, vocab_path=tmp_path / "data" / "vocab" / "f30k_precomp_vocab.json"
    )
    assert explicit.vocab == dm.vocab


def test_prepare_vocab_builds_from_training_captions(tmp_path, capsys):
    root = write_precomp(tmp_path, {"train": 6, "dev": 2, "test": 2}, vocab=False, img_dim=8)
    assert prepare(["vocab", str(root), "--threshold", "3"]) == 0
    out = root / f"{root.name}_vocab.json"
    assert out.is_file() and "ids" in capsys.readouterr().out
    captions = (root / "train_caps.txt").read_text().splitlines()
    built = Vocabulary.from_json(out)
    assert built == Vocabulary.build(captions, threshold=3)
    counts: dict[str, int] = {}
    for c in captions:
        for t in tokenize(c):
            counts[t] = counts.get(t, 0) + 1
    assert set(built.word2idx) - {"<pad>", "<start>", "<end>", "<unk>"} == {
        w for w, n in counts.items() if n >= 3
    }
    data = json.loads(out.read_text())  # the SCAN structure
    assert set(data) == {"word2idx", "idx2word", "idx"} and data["idx"] == len(built)
    # the DataModule finds it; no overwrite without --force
    assert PrecompDataModule(root).vocab == built
    assert prepare(["vocab", str(root)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bert_tokenizer_needs_no_word_vocabulary(tmp_path, tiny_bert):
    from itm.data.tokenizers import BertCaptionTokenizer

    root = write_precomp(tmp_path, {"train": 4, "dev": 2, "test": 2}, vocab=False, img_dim=8)
    dm = PrecompDataModule(root)
    dm.tokenizer = BertCaptionTokenizer(tiny_bert)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    unk = dm.tokenizer.unk_id
    assert (batch["captions"][:, 1:-1] != unk).any()  # real words, not all [UNK]


# ---- pickling and lazy opening ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["npy", "h5"])
def test_stores_pickle_paths_not_features(stores, kind):
    dm = PrecompDataModule(stores[kind])
    dm.setup("fit")
    store = dm.get_split("train")
    _ = store.images[0]  # opens the map / file in this process
    blob = pickle.dumps(dm)
    assert len(blob) < 64_000  # features are 24 x 6 x 2048 x 4 = 1.2 MB
    clone = pickle.loads(blob)
    img = clone.get_split("train").images
    assert (img._array if kind == "npy" else img._ds) is None  # opened lazily, not carried
    assert np.array_equal(img[5], store.images[5])
    if kind == "h5":
        assert isinstance(store.images, H5Images)
        store.images.close()


@pytest.mark.parametrize("kind", ["npy", "h5"])
def test_image_indexing_negative_and_out_of_range(stores, kind):
    dm = PrecompDataModule(stores[kind])
    dm.setup("fit")
    images = dm.get_split("train").images
    ref = np.load(stores["npy"] / "train_ims.npy")
    assert np.array_equal(images[-1], ref[-1]) and np.array_equal(images[2:7:2], ref[2:7:2])
    with pytest.raises(IndexError, match=f"image index {len(ref)} out of range for {len(ref)}"):
        images[len(ref)]
    with pytest.raises(IndexError, match=f"image index -{len(ref) + 1} out of range"):
        images[-len(ref) - 1]


@pytest.mark.parametrize("kind", ["npy", "h5"])
def test_loader_workers_open_files_lazily(stores, kind):
    """Forked workers open their own map / HDF5 handle (the parent's is never used there)."""
    dm = PrecompDataModule(stores[kind], num_workers=2, eval_batch_size=5)
    dm.setup("fit")
    _ = dm.get_split("test").images[0]  # the parent holds a handle before the fork
    loader = dm.eval_dataloaders("test")[0]
    got = torch.cat([b["images"] for b in loader])
    ref = torch.from_numpy(np.load(stores["npy"] / "test_ims.npy"))
    assert torch.equal(got, ref)


@pytest.mark.slow  # a spawned worker re-imports torch (~15 s)
def test_h5_opens_in_a_spawned_worker(stores):
    from torch.utils.data import DataLoader

    from itm.data import ImageDataset

    store = PrecompDataModule(stores["h5"]).get_split("dev")
    _ = store.images[0]
    loader = DataLoader(
        ImageDataset(store),
        batch_size=4,
        num_workers=1,
        multiprocessing_context="spawn",
        collate_fn=collate_images,
    )
    got = torch.cat([b["images"] for b in loader])
    assert torch.equal(got, torch.from_numpy(np.load(stores["npy"] / "dev_ims.npy")))


# ---- the HDF5 store ---------------------------------------------------------------------------


def test_h5_store_matches_the_precomp_files(stores):
    import h5py

    npy = PrecompDataModule(stores["npy"], n_dev=None)
    h5 = PrecompDataModule(stores["h5"], n_dev=None)
    f16 = PrecompDataModule(stores["h5_f16"], n_dev=None)
    for split in ("train", "dev", "test"):
        a, b, c = npy.get_split(split), h5.get_split(split), f16.get_split(split)
        assert b.format == "h5" and b.images.dtype == np.float32 and c.images.dtype == np.float16
        assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
        np.testing.assert_allclose(np.asarray(c.images), np.asarray(a.images), rtol=1e-3, atol=1e-3)
        assert a.captions == b.captions == c.captions
        assert np.array_equal(a.cap_to_img, b.cap_to_img) and a.ids == b.ids
        assert np.array_equal(np.asarray(a.boxes), np.asarray(b.boxes))
    with h5py.File(stores["h5"] / "train.h5", "r") as f:
        assert f["images"].chunks == (1, 6, 2048)  # one image per chunk
        assert f.attrs["itm_format"] == "itm-h5" and bool(f.attrs["finite_checked"])
    assert (stores["h5"] / "tiny_precomp_vocab.json").is_file()  # copied along
    assert not list(stores["h5"].glob(".*tmp*"))
    assert (stores["h5_f16"] / "train.h5").stat().st_size < 0.6 * (
        stores["h5"] / "train.h5"
    ).stat().st_size


def test_h5_store_with_other_than_five_captions_per_image(tmp_path, compose):
    """An explicit caption -> image index: 1 to 4 captions per image, in any order; training,
    dev truncation and recall all follow it."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from itm.metrics import recall_at_k
    from itm.models.module import ITMModule
    from itm.train import build_datamodule

    rng = np.random.default_rng(0)
    vocab_caps: list[str] = []
    for split, n in {"train": 12, "dev": 6, "test": 6}.items():
        data = tiny_split(split, n, n_regions=4, img_dim=2048, cpi=4)
        counts = rng.integers(1, 5, size=n)
        keep = np.concatenate([np.arange(4 * i, 4 * i + counts[i]) for i in range(n)])
        perm = rng.permutation(len(keep))  # captions not grouped by image
        caps = [data.captions[j] for j in keep[perm]]
        cap_to_img = (keep // 4)[perm]
        write_h5(tmp_path / f"{split}.h5", data.images, caps, cap_to_img, split=split)
        vocab_caps += caps if split == "train" else []
    Vocabulary.build(vocab_caps, threshold=1).to_json(tmp_path / "var_vocab.json")

    cfg = compose(
        [
            "data=precomp",
            f"data.root={tmp_path}",
            "data.n_dev=4",
            "data.batch_size=8",
            "model.embed_size=16",
            "model.text_encoder.word_dim=8",
            "pooling=avg",
        ]
    )
    dm = build_datamodule(cfg)
    assert cfg.model.image_encoder.img_dim == 2048 and cfg.model.text_encoder.vocab_size > 4
    dev = dm.get_split("dev")
    assert dev.cap_to_img.max() == 3 and len(set(dev.cap_to_img.tolist())) == 4
    assert dm.get_split("test").summary()["caps/img"] != "5"
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert 0 <= float(trainer.callback_metrics["test/rsum"]) <= 600
    # the same figure from the explicit index by hand
    sims = _score(model, dm, "test")
    ref = recall_at_k(sims, cap_to_img=dm.get_split("test").cap_to_img)
    assert ref["rsum"] == pytest.approx(float(trainer.callback_metrics["test/rsum"]), abs=1e-3)


# ---- training and scoring through both stores -------------------------------------------------


def _score(model, dm: PrecompDataModule, split: str) -> torch.Tensor:
    """The full [N_img, N_cap] score matrix of ``split`` (float64 model)."""
    from itm.models.module import pad_cat

    model.eval()
    img_loader, cap_loader = dm.eval_dataloaders(split)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        imgs = [model.encode_images(b["images"].to(dtype), b["img_lens"]) for b in img_loader]
        caps = [model.encode_captions(b["captions"], b["cap_lens"]) for b in cap_loader]
        img, img_lens = pad_cat([e for e, _ in imgs]), torch.cat([n for _, n in imgs])
        cap, cap_lens = pad_cat([e for e, _ in caps]), torch.cat([n for _, n in caps])
        return model.similarity.score_matrix(img, img_lens, cap, cap_lens)


def test_train_cli_on_precomp(trained_on_npy):
    assert trained_on_npy.is_file()


def test_train_cli_on_h5_store(stores, tmp_path):
    proc = run_train_cli(
        ["data=precomp", f"data.root={stores['h5']}", "data.format=h5", *FAST], tmp_path
    )
    assert "rsum" in proc.stdout
    assert len(list(tmp_path.glob("train/runs/*/checkpoints/best.ckpt"))) == 1


def test_same_model_scores_the_same_matrix_from_both_stores(stores, trained_on_npy):
    from itm.models.module import ITMModule

    model = ITMModule.load_from_checkpoint(trained_on_npy, map_location="cpu").double()
    sims = {
        kind: _score(model, PrecompDataModule(stores[kind], format=fmt), "test")
        for kind, fmt in (("npy", "npy"), ("h5", "h5"), ("h5_f16", "auto"))
    }
    assert sims["npy"].shape == (8, 40)
    assert torch.equal(sims["npy"], sims["h5"])  # float32 store: bit-identical features
    torch.testing.assert_close(sims["h5_f16"], sims["npy"], rtol=0, atol=5e-3)


# ---- configs ----------------------------------------------------------------------------------


def test_data_presets_compose(compose, monkeypatch, stores):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    monkeypatch.setenv("ITM_F30K_DIR", str(stores["npy"]))
    cfg = compose(["data=f30k"])
    assert cfg.data.root == str(stores["npy"])
    assert instantiate(cfg.data).img_dim == 2048
    monkeypatch.setenv("ITM_DATA_DIR", "/datasets")
    monkeypatch.delenv("ITM_COCO_DIR", raising=False)
    assert compose(["data=coco"]).data.root == "/datasets/coco_precomp"
    cfg = compose(["data=precomp"])
    assert OmegaConf.is_missing(cfg.data, "root")
    with pytest.raises(MissingMandatoryValue):
        instantiate(cfg.data)
