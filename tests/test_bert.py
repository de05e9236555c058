"""BERT text encoder and caption tokenizer, offline, on a tiny randomly initialised BERT."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import write_tiny_bert  # noqa: E402
from itm.data.tokenizers import BertCaptionTokenizer  # noqa: E402
from itm.models.encoders import BertTextEncoder  # noqa: E402

WORDS = ["a", "the", "man", "woman", "dog", "cat", "red", "blue", "is", "on", "with", "##s", "."]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
D = 16


def _write_tiny_bert(directory: Path, with_tokenizer_config: bool = True) -> Path:
    return write_tiny_bert(directory, WORDS, tokenizer_files=with_tokenizer_config)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return _write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _batch(tok: BertCaptionTokenizer, captions: list[str]):
    ids = [tok.encode(c) for c in captions]
    lens = torch.tensor([len(i) for i in ids])
    out = torch.zeros(len(ids), int(lens.max()), dtype=torch.int64)
    for row, i in enumerate(ids):
        out[row, : len(i)] = torch.tensor(i)
    return out, lens


CAPTIONS = ["A man is on the RED dog.", "the cats", "a blue woman with a dog is on a cat"]


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_real_words_and_specials(bert_dir):
    tok = BertCaptionTokenizer(bert_dir)
    vocab = SPECIAL + WORDS
    assert len(tok) == len(vocab) and tok.vocab_size == len(vocab)
    assert tok.pad_id == 0 and tok.mask_id == vocab.index("[MASK]") and tok.unk_id == 1
    ids = tok.encode("A Man is on the RED dogs.")
    assert ids[0] == vocab.index("[CLS]") and ids[-1] == vocab.index("[SEP]")
    assert tok.unk_id not in ids  # lower-cased real words and word pieces are known
    assert [vocab[i] for i in ids[1:-1]] == [
        "a",
        "man",
        "is",
        "on",
        "the",
        "red",
        "dog",
        "##s",
        ".",
    ]
    assert tok.encode("zebra")[1] == tok.unk_id
    assert tok.decode(ids) == "a man is on the red dogs."


def test_tokenizer_ignores_broken_tokenizer_json(tmp_path):
    """transformers 5: BertTokenizer(vocab_file=...) silently maps every word to [UNK] and
    save_pretrained writes that into tokenizer.json; vocab.txt must win."""
    from transformers import BertTokenizer

    d = _write_tiny_bert(tmp_path / "bert", with_tokenizer_config=False)
    BertTokenizer(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    tok = BertCaptionTokenizer(d)
    assert tok.unk_id not in tok.encode("the red dog")


def test_tokenizer_defaults_without_config(tmp_path):
    d = _write_tiny_bert(tmp_path / "bert", with_tokenizer_config=False)
    tok = BertCaptionTokenizer(d)
    assert tok.unk_id not in tok.encode("THE Red Dog")  # uncased by default


def test_tokenizer_pickle_round_trip(bert_dir):
    tok = BertCaptionTokenizer(bert_dir, max_length=5)
    data = pickle.dumps(tok)
    assert b"BertTokenizer\x94" not in data and len(data) < 1000  # only the path travels
    clone = pickle.loads(data)
    assert clone._tokenizer is None
    assert clone.encode(CAPTIONS[0]) == tok.encode(CAPTIONS[0])
    assert len(clone.encode(CAPTIONS[2])) == 5 and clone.encode(CAPTIONS[2])[-1] == 3
    assert len(clone) == len(tok) and clone.mask_id == tok.mask_id


def test_tokenizer_errors_name_the_path(tmp_path):
    missing = tmp_path / "no_such_bert"
    with pytest.raises(FileNotFoundError, match="no_such_bert"):
        BertCaptionTokenizer(missing)
    empty = tmp_path / "empty_bert"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_bert.*vocab\.txt"):
        BertCaptionTokenizer(empty)
    bad = tmp_path / "bad_pad"
    bad.mkdir()
    (bad / "vocab.txt").write_text("\n".join(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "a"]))
    with pytest.raises(ValueError, match="bad_pad"):
        BertCaptionTokenizer(bad)


# --- encoder ---------------------------------------------------------------------------------


def test_encoder_loads_offline_and_normalises(bert_dir):
    enc = BertTextEncoder(str(bert_dir), embed_size=D).eval()
    assert enc.fc.in_features == 32 and enc.fc.out_features == D
    assert enc.mask_id == 4 and enc.n_special == 5 and enc.vocab_size == len(SPECIAL + WORDS)
    tokens, lens = _batch(BertCaptionTokenizer(bert_dir), CAPTIONS)
    with torch.no_grad():
        out = enc(tokens, lens)
    assert out.shape == (3, tokens.shape[1], D)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, tokens.shape[1]))
    raw = BertTextEncoder(str(bert_dir), embed_size=D, norm=False).eval()
    raw.load_state_dict(enc.state_dict())
    with torch.no_grad():
        manual = enc.fc(enc.bert(input_ids=tokens, attention_mask=(tokens != 0).long())[0])
        torch.testing.assert_close(raw(tokens, lens), manual, rtol=1e-5, atol=1e-6)


def test_encoder_padding_garbage_irrelevant(bert_dir):
    enc = BertTextEncoder(str(bert_dir), embed_size=D).eval()
    tokens, lens = _batch(BertCaptionTokenizer(bert_dir), CAPTIONS)
    valid = torch.arange(tokens.shape[1])[None, :] < lens[:, None]
    garbage = torch.where(valid, tokens, torch.randint(0, 10_000, tokens.shape))
    with torch.no_grad():
        a, b = enc(tokens, lens), enc(garbage, lens)
        torch.testing.assert_close(a[valid], b[valid], rtol=1e-5, atol=1e-6)
        # each caption alone at its own length gives the same embeddings
        for i, n in enumerate(lens.tolist()):
            alone = enc(tokens[i : i + 1, :n], lens[i : i + 1])[0]
            torch.testing.assert_close(a[i, :n], alone, rtol=1e-4, atol=1e-5)


def test_encoder_lr_mult_groups(bert_dir):
    enc = BertTextEncoder(str(bert_dir), embed_size=D)
    groups = enc.lr_mult_groups()
    assert len(groups) == 1
    params, mult = groups[0]
    assert mult == 0.1
    assert {id(p) for p in params} == {id(p) for p in enc.bert.parameters()}
    assert not {id(p) for p in params} & {id(p) for p in enc.fc.parameters()}
    assert BertTextEncoder(str(bert_dir), embed_size=D, lr_mult=0.5).lr_mult_groups()[0][1] == 0.5


def test_encoder_word_aug_and_gradients(bert_dir):
    torch.manual_seed(0)
    enc = BertTextEncoder(str(bert_dir), embed_size=D, word_aug=0.5)
    tokens, lens = _batch(BertCaptionTokenizer(bert_dir), CAPTIONS)
    enc.eval()
    with torch.no_grad():
        assert isinstance(enc(tokens, lens), torch.Tensor)  # eval: no augmentation
    enc.train()
    out, new = enc(tokens, lens)
    assert out.shape == (3, int(new.max()), D) and (new <= lens).all() and (new >= 2).all()
    valid = torch.arange(out.shape[1])[None, :] < new[:, None]
    out[valid].sum().backward()
    grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert (
        enc.fc.weight.grad is not None
        and enc.bert.embeddings.word_embeddings.weight.grad is not None
    )


def test_encoder_missing_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere_bert"):
        BertTextEncoder(str(tmp_path / "nowhere_bert"))
    with pytest.raises(FileNotFoundError, match=r"set model\.text_encoder\.path"):
        BertTextEncoder("???")
    empty = tmp_path / "empty_bert"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_bert.*config\.json"):
        BertTextEncoder(str(empty))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    from transformers import BertConfig

    BertConfig(
        vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1
    ).save_pretrained(no_weights)
    with pytest.raises((ValueError, FileNotFoundError), match="no_weights"):
        BertTextEncoder(str(no_weights))


def test_bert_config_instantiates(compose, bert_dir):
    from hydra.utils import instantiate

    cfg = compose(
        ["model/text_encoder=bert", f"model.text_encoder.path={bert_dir}", "model.embed_size=16"]
    )
    enc = instantiate(cfg.model.text_encoder)
    assert isinstance(enc, BertTextEncoder) and enc.lr_mult == 0.1 and enc.word_aug == 0.0
    assert enc.fc.out_features == 16
