"""CHAN's self-attention region encoder (``model/image_encoder=selfattn``) and GloVe
initialisation of the BiGRU word table (CHAN's ``--wemb_type=glove``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from itm.models.encoders import BiGRUTextEncoder, SelfAttentionImageEncoder
from itm.models.encoders.glove import glove_fallback, read_glove, without_word_vectors
from itm.released.base import read_checkpoint

RELEASED = Path(__file__).resolve().parent / "data" / "released"


def chan_encoder() -> SelfAttentionImageEncoder:
    """The encoder with the chan_bigru case's image weights (CHAN's names mapped by hand)."""
    img = read_checkpoint(RELEASED / "chan_bigru" / "model_best.pth")["model"][0]
    enc = SelfAttentionImageEncoder(2048, 16)
    state = {k.replace("feedforward.", ""): v for k, v in img.items()}
    enc.load_state_dict(state, strict=True)
    return enc.eval()


def test_reproduces_the_authors_region_embeddings():
    """The chan_bigru case's img_emb: CHAN's EncoderImagePrecomp(selfattention) outputs."""
    with np.load(RELEASED / "chan_bigru" / "expected.npz") as e:
        want = e["img_emb"]
    images = torch.from_numpy(np.load(RELEASED / "test_ims.npy"))
    with torch.no_grad():
        got = chan_encoder()(images, torch.full((6,), 36))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_full_images_take_the_unmasked_path():
    """With every slot valid no mask is passed: bit-identical to the plain attention call."""
    enc = chan_encoder()
    images = torch.from_numpy(np.load(RELEASED / "test_ims.npy"))
    with torch.no_grad():
        got = enc.embed(images, torch.full((6,), 36))
        x = enc.fc(images)
        y = enc.ln(x)
        plain = x + enc.attn(y, y, y, need_weights=False)[0]
    assert torch.equal(got, plain)


def test_padded_regions_are_masked_and_may_hold_garbage():
    """An image's valid regions give the same result alone and padded with garbage."""
    enc = chan_encoder()
    images = torch.from_numpy(np.load(RELEASED / "test_ims.npy"))
    lens = torch.tensor([36, 20, 7, 1, 36, 13])
    padded = images.clone()
    gen = torch.Generator().manual_seed(0)
    for b, n in enumerate(lens.tolist()):
        padded[b, n:] = torch.randn(36 - n, 2048, generator=gen) * 50.0
    with torch.no_grad():
        batch = enc(padded, lens)
        for b, n in enumerate(lens.tolist()):
            alone = enc(images[b : b + 1, :n], torch.tensor([n]))
            torch.testing.assert_close(batch[b, :n], alone[0], rtol=0, atol=2e-6)
    assert torch.isfinite(batch).all()


def test_region_drop_in_training_only():
    enc = SelfAttentionImageEncoder(24, 16, region_drop=0.5)
    x, lens = torch.randn(4, 10, 24), torch.tensor([10, 8, 5, 1])
    out, new = enc.train()(x, lens)
    assert out.shape[0] == 4 and bool((new <= lens).all()) and bool((new >= 1).all())
    assert enc.eval()(x, lens).shape == (4, 10, 16)


def test_config_instantiates_small(compose):
    cfg = compose(["model/image_encoder=selfattn", "model.embed_size=16"])
    enc = instantiate(cfg.model.image_encoder)
    assert isinstance(enc, SelfAttentionImageEncoder) and enc.num_heads == 8
    with pytest.raises(ValueError, match="multiple of num_heads"):
        SelfAttentionImageEncoder(24, 12)
    recipe = compose(["experiment=chan_bigru"])
    assert recipe.model.image_encoder._target_.endswith("SelfAttentionImageEncoder")


# --- GloVe ----------------------------------------------------------------------------------------


def write_glove(path: Path, rows: list[tuple[str, list[float]]]) -> Path:
    path.write_text("".join(f"{w} {' '.join(str(x) for x in v)}\n" for w, v in rows))
    return path


def write_vocab(path: Path, words: list[str]) -> Path:
    specials = ["<pad>", "<start>", "<end>", "<unk>"]
    w2i = {w: i for i, w in enumerate(specials + words)}
    path.write_text(json.dumps({"word2idx": w2i, "idx2word": {str(i): w for w, i in w2i.items()}}))
    return path


GLOVE = [
    ("dog", [0.1, 0.2, 0.3, 0.4]),
    ("tshirt", [1.0, 1.5, 2.0, 2.5]),  # the hyphen-free form of "t-shirt"
    ("hi", [9.0, 8.0, 7.0, 6.0]),  # found for "hi/fi" by the part before "/"
    ("t-shirt", [5.0, 5.0, 5.0, 5.0]),  # listed after "tshirt": the exact form wins
    ("dog", [7.0, 7.0, 7.0, 7.0]),  # a second line of a word: the first one wins
    ("the", [-1.0, -2.0, -3.0, -4.0]),
    ("a b", [3.0, 3.0, 3.0, 3.0]),  # a word holding a space (840B has some)
]
VEC = dict(GLOVE[:4] + GLOVE[5:])


def test_glove_initialises_the_rows_it_holds(tmp_path):
    glove = write_glove(tmp_path / "glove.4d.txt", GLOVE)
    vocab = write_vocab(tmp_path / "v.json", ["dog", "t-shirt", "hi/fi", "zebra", "the", "a"])
    torch.manual_seed(0)
    enc = BiGRUTextEncoder(
        10, word_dim=4, embed_size=8, glove_path=str(glove), vocab_path=str(vocab)
    )
    table = enc.embed.weight.detach()
    torch.testing.assert_close(table[4], torch.tensor(VEC["dog"]))
    torch.testing.assert_close(table[5], torch.tensor(VEC["t-shirt"]))  # exact form first
    torch.testing.assert_close(table[6], torch.tensor(VEC["hi"]))
    torch.testing.assert_close(table[8], torch.tensor(VEC["the"]))
    assert not torch.equal(table[9], torch.full((4,), 3.0))  # "a" is not "a b"
    assert 0.3 < float(table[[0, 1, 2, 3, 7, 9]].std()) < 3.0  # the rest: N(0, 1), as CHAN
    assert glove_fallback("t-shirt") == "tshirt" and glove_fallback("hi/fi") == "hi"
    rows, vectors, missing = read_glove(glove, {"zebra": 0, "dog": 1}, 4)
    assert rows.tolist() == [1] and missing == ["zebra"] and vectors.shape == (1, 4)


def test_glove_errors(tmp_path):
    glove = write_glove(tmp_path / "glove.txt", GLOVE)
    vocab = write_vocab(tmp_path / "v.json", ["dog"])
    with pytest.raises(ValueError, match="needs model.text_encoder.vocab_path"):
        BiGRUTextEncoder(10, 4, 8, glove_path=str(glove))
    with pytest.raises(ValueError, match="first vector has 4 numbers, the embedding 6"):
        BiGRUTextEncoder(10, 6, 8, glove_path=str(glove), vocab_path=str(vocab))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        BiGRUTextEncoder(10, 4, 8, glove_path=str(tmp_path / "missing.txt"), vocab_path=str(vocab))
    with pytest.raises(ValueError, match="holds 5 words, the word table 3 rows"):  # 4 + "dog"
        BiGRUTextEncoder(3, 4, 8, glove_path=str(glove), vocab_path=str(vocab))
    other = write_glove(tmp_path / "other.txt", [("cat", [1.0, 2.0, 3.0, 4.0])])
    with pytest.raises(ValueError, match="holds none of the"):
        BiGRUTextEncoder(10, 4, 8, glove_path=str(other), vocab_path=str(vocab))


def test_evaluation_rebuilds_without_reading_glove(compose, tmp_path):
    """A model trained from GloVe evaluates where the GloVe file is gone."""
    from omegaconf import OmegaConf

    from itm.evaluate import load_checkpoint
    from itm.models.module import ITMModule

    glove = write_glove(tmp_path / "glove.txt", GLOVE)
    vocab = write_vocab(tmp_path / "v.json", ["dog", "the"])
    cfg = compose(
        [
            "experiment=chan_bigru",
            "model.embed_size=16",
            "model.text_encoder.word_dim=4",
            "model.text_encoder.vocab_size=6",
            f"model.text_encoder.glove_path={glove}",
            f"model.text_encoder.vocab_path={vocab}",
        ]
    )
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    glove.unlink()
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.text_encoder.embed.weight, model.text_encoder.embed.weight)
    kept = {"text_encoder": {"glove_path": "/gone.txt"}}
    assert without_word_vectors(kept)["text_encoder"]["glove_path"] is None
    assert kept["text_encoder"]["glove_path"] == "/gone.txt"  # the input is not changed
