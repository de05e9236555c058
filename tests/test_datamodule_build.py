"""One DataModule builder for training, evaluation and the notebooks; the caption tokenizer comes
from the text encoder's class, never from sniffing a ``path`` key of its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from itm.data import Vocabulary
from itm.data.build import build_datamodule
from itm.data.tokenizers import BertCaptionTokenizer

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


class CharTokenizer:
    """A caption tokenizer of a test text encoder: one id per character (pad 0)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def encode(self, caption: str) -> list[int]:
        return [self.offset + ord(c) % 50 for c in caption]

    def __len__(self) -> int:
        return self.offset + 50


class CharTextEncoder:
    """Stands for a text encoder with a tokenizer of its own and no ``path`` in its config."""

    @classmethod
    def caption_tokenizer(cls, config):
        return CharTokenizer(int(config["offset"]))


def test_a_word_encoder_with_a_path_key_keeps_the_word_vocabulary(compose):
    """The BiGRU's config may carry a ``path`` (of anything): it is not a BERT directory.
    Before the fix, ``"path" in text_cfg`` built a BertCaptionTokenizer from it and failed."""
    from itm.train import build_datamodule as train_build

    cfg = compose(["model/text_encoder=bigru", "+model.text_encoder.path=/no/such/bert"])
    dm = train_build(cfg)
    assert isinstance(dm.caption_tokenizer, Vocabulary)
    assert cfg.model.text_encoder.vocab_size == len(dm.vocab)


def test_eval_builds_the_data_like_training(compose):
    from itm.evaluate import build_data

    cfg = compose(["model/text_encoder=bigru", "+model.text_encoder.path=/no/such/bert"])
    eval_cfg = OmegaConf.create({"eval": {"batch_size": 7}})
    dm = build_data(eval_cfg, cfg.data, cfg.model)
    assert isinstance(dm.caption_tokenizer, Vocabulary) and dm.eval_batch_size == 7


def test_the_text_encoder_class_provides_the_tokenizer():
    data = {"_target_": "itm.data.SyntheticDataModule", "n_train": 16, "n_dev": 8, "n_test": 8}
    model = {"text_encoder": {"_target_": f"{__name__}.CharTextEncoder", "offset": 4}}
    dm = build_datamodule(data, model)
    assert isinstance(dm.caption_tokenizer, CharTokenizer)
    batch = next(iter(dm.eval_dataloaders("dev")[1]))  # captions in dataset order
    caption = dm.get_split("dev").captions[0]
    # the dataset's ids are the encoder's tokenizer's, not the word vocabulary's
    ids = [i for i in batch["captions"][0].tolist() if i != 0]
    assert ids == CharTokenizer(4).encode(caption)


def test_bert_encoders_bring_their_wordpiece_tokenizer(tiny_bert):
    data = {"_target_": "itm.data.SyntheticDataModule", "n_train": 16, "n_dev": 8, "n_test": 8}
    for target in ("BertTextEncoder", "BertCNNTextEncoder"):
        model = {"text_encoder": {"_target_": f"itm.models.encoders.{target}", "path": tiny_bert}}
        tok = build_datamodule(data, model).caption_tokenizer
        assert isinstance(tok, BertCaptionTokenizer) and tok.path == str(tiny_bert)
    missing = {"text_encoder": {"_target_": "itm.models.encoders.BertTextEncoder", "path": "/x"}}
    with pytest.raises(FileNotFoundError, match="/x"):
        build_datamodule(data, missing)


def test_no_other_datamodule_construction_in_train_eval_or_notebooks():
    """train.py, evaluate.py and the notebooks build their data through one builder."""
    import itm.evaluate
    import itm.train

    for module in (itm.train, itm.evaluate):
        text = Path(module.__file__).read_text(encoding="utf-8")
        assert "instantiate(cfg.data" not in text and "instantiate(data_cfg" not in text
        assert "BertCaptionTokenizer" not in text, module.__name__
    for nb in NOTEBOOKS.glob("*.ipynb"):
        source = "".join(
            "".join(c["source"])
            for c in json.loads(nb.read_text())["cells"]
            if c["cell_type"] == "code"
        )
        assert "DataModule(" not in source and "instantiate(" not in source.replace(
            "instantiate(cfg.model", ""
        ), nb.name


def test_captions_become_ids_in_one_place():
    """The pair dataset, the caption dataset and ``dm.encode_caption`` (what the notebooks
    and pictures use) give the same ids, whatever the tokenizer returns (here a tuple)."""
    from itm.data import CaptionDataset, CaptionPairDataset, SyntheticDataModule, encode_caption

    class TupleTokenizer(CharTokenizer):
        def encode(self, caption: str):  # a tuple, not a list
            return tuple(super().encode(caption))

    dm = SyntheticDataModule(n_train=16, n_dev=8, n_test=8)
    dm.tokenizer = TupleTokenizer(4)
    store = dm.get_split("dev")
    caption = store.captions[3]
    want = encode_caption(dm.caption_tokenizer, caption)
    assert want.dtype == torch.int64 and want.tolist() == list(TupleTokenizer(4).encode(caption))
    assert torch.equal(dm.encode_caption(caption), want)
    assert torch.equal(CaptionDataset(store, dm.caption_tokenizer)[3]["caption"], want)
    assert torch.equal(CaptionPairDataset(store, dm.caption_tokenizer)[3]["caption"], want)


def test_datasets_and_notebooks_do_not_tokenize_by_themselves():
    """Only ``encode_caption`` calls a tokenizer's ``encode`` in the data layer and notebooks."""
    import itm.data.datamodule

    text = Path(itm.data.datamodule.__file__).read_text(encoding="utf-8")
    assert text.count(".encode(") == 1, "captions tokenised outside encode_caption"
    for nb in NOTEBOOKS.glob("*.ipynb"):
        assert ".encode(" not in nb.read_text(), nb.name
