"""Tests of itm.data: vocabulary, synthetic generator, datasets, collate and DataModules."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from itm.data import (
    END_ID,
    PAD_ID,
    START_ID,
    UNK_ID,
    ArraySplit,
    CaptionPairDataset,
    SyntheticDataModule,
    Vocabulary,
    collate_captions,
    collate_images,
    collate_pairs,
    generate_synthetic,
    oracle_recall,
    tokenize,
)

SMALL = {
    "n_concepts": 16,
    "n_regions": 6,
    "img_dim": 8,
    "concepts_per_image": (2, 3),
    "words_per_caption": (4, 8),
    "n_filler": 20,
    "n_distractors": 4,
}


def small_dm(**kw: object) -> SyntheticDataModule:
    args = {"n_train": 40, "n_dev": 7, "n_test": 9, "batch_size": 8, "eval_batch_size": 3}
    args.update(SMALL)
    args.update(kw)
    return SyntheticDataModule(**args)


# ---- tokenizer and vocabulary -----------------------------------------------------------------


def test_tokenize_lowercases_and_keeps_punctuation() -> None:
    assert tokenize("A Dog, running.") == ["a", "dog", ",", "running", "."]
    assert tokenize("Don't  stop the dog's t-shirt") == [
        "do",
        "n't",
        "stop",
        "the",
        "dog",
        "'s",
        "t-shirt",
    ]
    assert tokenize("   ") == []


def test_vocab_special_ids_and_unknown() -> None:
    vocab = Vocabulary.build(["a dog runs", "a cat", "a dog"], threshold=2)
    assert [vocab.word2idx[w] for w in ("<pad>", "<start>", "<end>", "<unk>")] == [0, 1, 2, 3]
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    assert vocab.idx2word[0] == "<pad>"
    assert len(vocab) == 6  # 4 specials + "a" (3x) + "dog" (2x)
    assert vocab("dog") >= 4 and vocab("cat") == UNK_ID and vocab("zebra") == UNK_ID


def test_vocab_build_is_order_independent() -> None:
    caps = ["b a c", "c a", "a b"]
    assert Vocabulary.build(caps, threshold=1) == Vocabulary.build(caps[::-1], threshold=1)


def test_encode_counts_start_and_end() -> None:
    vocab = Vocabulary(["a", "dog"])
    ids = vocab.encode("A dog jumps")
    assert ids == [START_ID, vocab("a"), vocab("dog"), UNK_ID, END_ID]
    assert len(ids) == len(tokenize("A dog jumps")) + 2
    assert vocab.encode("") == [START_ID, END_ID]
    assert vocab.decode(ids) == "a dog <unk>"
    assert vocab.decode(torch.tensor(ids + [PAD_ID, PAD_ID])) == "a dog <unk>"


def test_vocab_json_round_trip(tmp_path: Path) -> None:
    vocab = Vocabulary.build(["a man rides a horse .", "two dogs"], threshold=1)
    path = tmp_path / "v_vocab.json"
    vocab.to_json(path)
    data = json.loads(path.read_text())
    assert set(data) == {"word2idx", "idx2word", "idx"} and data["idx"] == len(vocab)
    assert all(isinstance(k, str) for k in data["idx2word"])
    loaded = Vocabulary.from_json(path)
    assert loaded == vocab and loaded.idx2word == vocab.idx2word
    assert [p.name for p in tmp_path.iterdir()] == ["v_vocab.json"]  # no temp file left


def test_vocab_loads_hand_written_scan_json(tmp_path: Path) -> None:
    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "."]
    scan = {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_text(json.dumps(scan))
    vocab = Vocabulary.from_json(path)
    assert len(vocab) == 7 and vocab.idx2word[5] == "dog" and vocab("dog") == 5
    assert vocab.encode("A dog.") == [1, 4, 5, 6, 2]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "word2idx"),
        ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": "3"}}', "integer"),
        ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 5}}', "contiguous"),
        ('{"word2idx": {"a": 0, "<start>": 1, "<end>": 2, "<unk>": 3}}', "<pad>"),
        (
            '{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3},'
            ' "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "x"}}',
            "disagrees",
        ),
    ],
)
def test_malformed_vocab_json_raises_naming_the_file(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "bad_vocab.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="bad_vocab.json") as err:
        Vocabulary.from_json(path)
    assert problem in str(err.value)


# ---- synthetic generator ----------------------------------------------------------------------


def test_generator_is_deterministic_and_seeded() -> None:
    a = generate_synthetic(12, seed=3, **SMALL)
    b = generate_synthetic(12, seed=3, **SMALL)
    c = generate_synthetic(12, seed=4, **SMALL)
    assert a.images.dtype == np.float32 and a.images.shape == (12, 6, 8)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    assert not np.array_equal(a.images, c.images) and a.captions != c.captions
    # splits of one world share prototypes and words
    assert a.concept_words == c.concept_words and a.filler_words == c.filler_words
    other_world = generate_synthetic(12, seed=3, world_seed=1, **SMALL)
    assert other_world.concept_words != a.concept_words


def test_captions_name_only_their_images_concepts() -> None:
    split = generate_synthetic(30, seed=0, **SMALL)
    assert len(split.captions) == 30 * 5 and len(split) == 30
    np.testing.assert_array_equal(split.cap_to_img, np.repeat(np.arange(30), 5))
    word_to_concept = {w: c for c, w in enumerate(split.concept_words)}
    assert not set(word_to_concept) & set(split.filler_words)
    for c, caption in enumerate(split.captions):
        img = c // 5
        named = [word_to_concept[w] for w in caption.split() if w in word_to_concept]
        assert len(named) >= 1
        assert set(named) <= set(split.concepts[img].tolist())
        assert named == split.caption_concepts[c].tolist()
    for i in range(30):
        assert len(set(split.captions[5 * i : 5 * i + 5])) == 5  # the five captions differ
        assert len(set(split.concepts[i].tolist())) == len(split.concepts[i])


def test_concept_regions_carry_prototypes() -> None:
    split = generate_synthetic(20, seed=0, noise=0.1, distractor_prob=0.0, **SMALL)
    from itm.data import make_world

    world = make_world(0, n_concepts=16, img_dim=8, n_distractors=4, n_filler=20)
    protos = world.prototypes / np.linalg.norm(world.prototypes, axis=1, keepdims=True)
    for i in range(20):
        for c, r in zip(split.concepts[i], split.concept_regions[i], strict=True):
            region = split.images[i, r] / np.linalg.norm(split.images[i, r])
            assert int(np.argmax(protos @ region)) == c


def test_default_caption_lengths_and_oracle() -> None:
    split = generate_synthetic(50, seed=0)
    lengths = [len(tokenize(c)) + 2 for c in split.captions]
    assert min(lengths) >= 6 and max(lengths) <= 14
    ceiling = oracle_recall(split)
    assert ceiling["i2t_r10"] > 95 and ceiling["t2i_r10"] > 95


# ---- datasets and collate ---------------------------------------------------------------------


def test_collate_pads_captions_with_zero() -> None:
    vocab = Vocabulary(["a", "b", "c"])
    images = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    split = ArraySplit.from_arrays(images, ["a", "a b c", "b", "c c", "a b", "c", "b", "a"], 4)
    ds = CaptionPairDataset(split, vocab)
    batch = collate_pairs([ds[0], ds[1], ds[6]])
    assert batch["images"].shape == (3, 3, 4) and batch["images"].dtype == torch.float32
    assert batch["captions"].shape == (3, 5) and batch["captions"].dtype == torch.int64
    assert batch["cap_lens"].tolist() == [3, 5, 3]
    assert batch["img_lens"].tolist() == [3, 3, 3]
    assert batch["img_ids"].tolist() == [0, 0, 1] and batch["cap_ids"].tolist() == [0, 1, 6]
    assert batch["captions"][0, 3:].tolist() == [PAD_ID, PAD_ID]
    assert batch["captions"][1].tolist() == [START_ID, 4, 5, 6, END_ID]
    torch.testing.assert_close(batch["images"][2], torch.from_numpy(images[1]))
    for key in ("img_lens", "cap_lens", "img_ids", "cap_ids"):
        assert batch[key].dtype == torch.int64
    items = [{"caption": torch.tensor([1, 4, 2]), "cap_id": 7, "cap_img_id": 1}]
    items.append({"caption": torch.tensor([1, 2]), "cap_id": 8, "cap_img_id": 1})
    caps = collate_captions(items)
    assert caps["captions"].tolist() == [[1, 4, 2], [1, 2, 0]]
    assert caps["cap_lens"].tolist() == [3, 2] and caps["cap_img_ids"].tolist() == [1, 1]


def test_collate_pads_images_with_fewer_regions() -> None:
    items = [
        {"image": torch.ones(3, 2), "img_id": 0},
        {"image": torch.ones(5, 2), "img_id": 1},
    ]
    batch = collate_images(items)
    assert batch["images"].shape == (2, 5, 2) and batch["img_lens"].tolist() == [3, 5]
    assert batch["images"][0, 3:].abs().sum() == 0


def test_array_split_rejects_bad_caption_count() -> None:
    with pytest.raises(ValueError, match="5 per image"):
        ArraySplit.from_arrays(np.zeros((2, 3, 4), np.float32), ["a"] * 9)


# ---- DataModule -------------------------------------------------------------------------------


def test_attributes_available_before_setup() -> None:
    dm = small_dm()
    assert dm.img_dim == 8 and dm.n_regions == 6
    assert dm.vocab_size == len(dm.vocab) > 4
    split = dm.get_split("train")
    known = {w for c in split.captions for w in c.split()}
    assert all(dm.vocab(w) != UNK_ID for w in known)


def test_eval_loaders_enumerate_each_item_once_in_order() -> None:
    dm = small_dm()
    dm.setup("fit")
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    img_batches = list(loaders[0])
    cap_batches = list(loaders[1])
    img_ids = torch.cat([b["img_ids"] for b in img_batches]).tolist()
    cap_ids = torch.cat([b["cap_ids"] for b in cap_batches]).tolist()
    assert img_ids == list(range(7)) and cap_ids == list(range(35))
    cap_img = torch.cat([b["cap_img_ids"] for b in cap_batches]).numpy()
    np.testing.assert_array_equal(cap_img, dm.cap_to_img("dev"))
    assert dm.cap_to_img("dev").dtype == np.int64
    assert set(img_batches[0]) == {"images", "img_lens", "img_ids"}
    assert set(cap_batches[0]) == {"captions", "cap_lens", "cap_ids", "cap_img_ids"}
    images = torch.cat([b["images"] for b in img_batches]).numpy()
    np.testing.assert_array_equal(images, dm.get_split("dev").images)
    dm.setup("test")
    assert sum(len(b["img_ids"]) for b in dm.test_dataloader()[0]) == 9


def test_train_loader_covers_every_caption() -> None:
    dm = small_dm()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    cap_ids = torch.cat([b["cap_ids"] for b in batches])
    assert sorted(cap_ids.tolist()) == list(range(200))  # keeps the last, smaller batch
    b = batches[0]
    assert b["images"].shape == (8, 6, 8) and b["captions"].shape[0] == 8
    assert (b["img_ids"] == torch.as_tensor(dm.cap_to_img("train"))[b["cap_ids"]]).all()


def test_splits_are_deterministic_and_distinct() -> None:
    a, b = small_dm(seed=1), small_dm(seed=1)
    np.testing.assert_array_equal(a.get_split("test").images, b.get_split("test").images)
    assert a.get_split("dev").captions != a.get_split("test").captions
    assert small_dm(seed=2).get_split("test").captions != a.get_split("test").captions
    with pytest.raises(ValueError, match="unknown split"):
        a.get_split("validation")


def test_datamodule_pickle_round_trip() -> None:
    dm = small_dm(seed=5, num_workers=0)
    dm.setup("fit")
    clone = pickle.loads(pickle.dumps(dm))
    assert clone.vocab == dm.vocab and clone.vocab_size == dm.vocab_size
    assert clone.batch_size == 8 and clone.hparams["seed"] == 5
    np.testing.assert_array_equal(clone.get_split("train").images, dm.get_split("train").images)
    clone.setup("fit")
    batch = next(iter(clone.val_dataloader()[1]))
    assert batch["cap_ids"].tolist() == [0, 1, 2]
