"""Hostile inputs outside the data files (those are in test_data_validation.py / test_precomp.py):
lengths, a batch of one, unknown config options, a BERT path with no model, checkpoints that are
missing, truncated, foreign or of another architecture, ``ckpt_path=last`` with no run. Every
refusal names the option / file and the problem; the tests assert the message."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from itm.checkpoint import CheckpointError, check_model_config, load_checkpoint_file
from itm.models import Similarity
from itm.models.module import ITMModule

TINY = [
    "debug=fast",
    "model.embed_size=16",
    "model.text_encoder.word_dim=8",
    "data.n_train=16",
    "data.n_dev=8",
    "data.n_test=8",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "logger=csv",
    "callbacks.alignment_images=null",
    "callbacks.progress_bar=null",
]


def _cfg(compose, tmp_path, overrides=()):
    cfg = compose([*TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "train" / "runs" / "now")
        cfg.paths.log_dir = str(tmp_path)
    return cfg


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A finished tiny SCAN run: its last.ckpt."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR
    from itm.train import train

    root = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=[*TINY, "test=false"])
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "train" / "runs" / "old")
        cfg.paths.log_dir = str(root)
    train(cfg)
    return root / "train" / "runs" / "old" / "checkpoints" / "last.ckpt"


def _model(compose, overrides=()):
    from itm.train import build_datamodule

    cfg = compose([*TINY, *overrides])
    build_datamodule(cfg)  # sets vocab_size / img_dim
    from omegaconf import OmegaConf

    return ITMModule(OmegaConf.to_container(cfg.model, resolve=True))


def _batch(model, b=3, k=4, n=5):
    vocab = model.text_encoder.embed.num_embeddings
    img_dim = model.image_encoder.fc.in_features
    return {
        "images": torch.randn(b, k, img_dim),
        "img_lens": torch.full((b,), k),
        "captions": torch.randint(4, vocab, (b, n)),
        "cap_lens": torch.full((b,), n),
        "img_ids": torch.arange(b),
    }


# --- lengths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("cap_lens", 0, "cap_lens must lie in 1..5 (the padded number of tokens), got 0 at batch"),
        ("cap_lens", 6, "cap_lens must lie in 1..5 (the padded number of tokens), got 6 at batch"),
        ("img_lens", 0, "img_lens must lie in 1..4 (the padded number of regions), got 0 at batch"),
        ("img_lens", 9, "img_lens must lie in 1..4 (the padded number of regions), got 9 at batch"),
    ],
)
def test_batch_lengths_zero_or_past_padded_size(compose, field, value, msg):
    model = _model(compose)
    batch = _batch(model)
    batch[field][1] = value
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        model(batch)
    assert "position 1" in str(pytest.raises(ValueError, model, batch).value)


@pytest.mark.parametrize("which", ["img_lens", "cap_lens"])
@pytest.mark.parametrize("value", [0, 7])
def test_similarity_lengths_zero_or_past_padded_size(which, value):
    sim = Similarity(
        __import__("itm.models.align", fromlist=["SCAN"]).SCAN(),
        __import__("itm.models.pooling", fromlist=["AvgPool"]).AvgPool(),
    )
    img, cap = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    lens = {"img_lens": torch.tensor([3, 2]), "cap_lens": torch.tensor([4, 1])}
    lens[which][0] = value
    padded = 3 if which == "img_lens" else 4
    with pytest.raises(ValueError, match=rf"{which} must lie in 1\.\.{padded} \(the padded size\)"):
        sim(img, lens["img_lens"], cap, lens["cap_lens"])


def test_lengths_of_wrong_shape(compose):
    model = _model(compose)
    batch = _batch(model)
    batch["cap_lens"] = batch["cap_lens"][:2]
    with pytest.raises(ValueError, match=r"cap_lens must have shape \[3\] for a batch of shape"):
        model(batch)


# --- a batch of one ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["fc", "mlp"])
def test_batch_of_one_trains_with_zero_loss(compose, encoder):
    """Documented handling: a batch of ONE pair has no negatives, so its hinge loss is exactly
    0 (gradient 0) and training goes on; it happens as the last batch of an epoch when the
    number of captions is 1 modulo the batch size (drop_last=False)."""
    model = _model(compose, [f"model/image_encoder={encoder}"])
    model.train()
    batch = _batch(model, b=1, k=4, n=2)
    sims = model(batch)
    assert sims.shape == (1, 1) and torch.isfinite(sims).all()
    loss = model.criterion(sims, max_violation=True)
    assert float(loss) == 0.0
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_batch_of_one_as_last_batch_end_to_end(compose, tmp_path):
    """16 images x 5 captions = 80 pairs with batch size 79: the second batch holds one pair."""
    from itm.train import train

    cfg = _cfg(compose, tmp_path, ["data.batch_size=79", "trainer.limit_train_batches=null"])
    metrics = train(cfg)
    assert all(v == v for v in metrics.values())


# --- unknown config options ----------------------------------------------------------------------


def test_unknown_top_level_option(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose(["no_such_option=1"])
    text = str(err.value) + str(err.value.__cause__)
    assert "no_such_option" in text and "not in struct" in text


def test_unknown_nested_option(compose):
    with pytest.raises(ConfigCompositionException) as err:
        compose(["model.align.lamda_softmax=4"])  # a typo of lambda_softmax
    text = str(err.value) + str(err.value.__cause__)
    assert "lamda_softmax" in text


def test_unknown_option_forced_into_a_node_names_it(compose):
    """``+model.align.foo=1`` composes, but the head refuses the argument by name."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = compose(["+model.align.foo=1"])
    with pytest.raises(InstantiationException, match="foo"):
        instantiate(cfg.model.align)


def test_unknown_group_option(compose):
    with pytest.raises(ConfigCompositionException, match="Could not find 'pooling/median'"):
        compose(["pooling=median"])


# --- BERT path with no model ----------------------------------------------------------------------


def _bert_cfg(compose, tmp_path, path):
    cfg = compose(
        [o for o in TINY if "word_dim" not in o]
        + ["model/text_encoder=bert", f"model.text_encoder.path={path}"]
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "train" / "runs" / "now")
        cfg.paths.log_dir = str(tmp_path)
    return cfg


def test_bert_path_missing(compose, tmp_path):
    from itm.train import train

    missing = tmp_path / "no_bert_here"
    with pytest.raises(FileNotFoundError, match=f"'{missing}' does not exist"):
        train(_bert_cfg(compose, tmp_path, missing))
    assert not (tmp_path / "train/runs/now/checkpoints").exists()  # refused before training


def test_bert_path_unset(compose):
    from hydra.utils import instantiate

    cfg = compose(["model/text_encoder=bert"])
    with open_dict(cfg):
        cfg.model.text_encoder.path = ""
    with pytest.raises(Exception, match="set model.text_encoder.path to a local BERT directory"):
        instantiate(cfg.model.text_encoder)


def test_bert_dir_without_config(tmp_path):
    from itm.models.encoders.bert import BertTextEncoder

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        BertTextEncoder(str(tmp_path), embed_size=8)


def test_bert_dir_with_config_but_no_weights(tmp_path):
    from itm.models.encoders.bert import BertTextEncoder

    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    config = {"model_type": "bert", "vocab_size": 6, "hidden_size": 8, "num_hidden_layers": 1}
    config.update(num_attention_heads=2, intermediate_size=16)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"cannot load a BertModel from '{tmp_path}'"):
        BertTextEncoder(str(tmp_path), embed_size=8)


# --- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_of_another_architecture_names_the_difference(compose, tmp_path, trained_ckpt):
    from itm.train import train

    cfg = _cfg(compose, tmp_path, ["model/align=bfan", f"ckpt_path={trained_ckpt}"])
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    msg = str(err.value)
    assert str(trained_ckpt) in msg and "another architecture" in msg
    assert "model.align._target_: checkpoint 'itm.models.align.scan.SCAN'" in msg
    assert "itm.models.align.bfan.BFAN" in msg
    assert not (tmp_path / "train/runs/now/checkpoints").exists()  # refused before training


def test_checkpoint_of_another_embed_size(compose, tmp_path, trained_ckpt):
    from itm.train import train

    cfg = _cfg(compose, tmp_path, ["model.embed_size=24", f"ckpt_path={trained_ckpt}"])
    with pytest.raises(CheckpointError, match="model.embed_size: checkpoint 16, this run 24"):
        train(cfg)


def test_checkpoint_of_other_data_vocabulary(compose, tmp_path, trained_ckpt):
    """Another synthetic world -> another vocabulary size: named, not a state_dict size error."""
    from itm.train import train

    cfg = _cfg(compose, tmp_path, ["data.n_filler=150", f"ckpt_path={trained_ckpt}"])
    with pytest.raises(CheckpointError, match=r"model.text_encoder.vocab_size: checkpoint \d+"):
        train(cfg)


def test_module_refuses_foreign_state_in_load_hook(compose, trained_ckpt):
    """The check also guards trainer.fit / load_from_checkpoint outside itm.train."""
    ckpt = torch.load(trained_ckpt, weights_only=True)
    model = _model(compose, ["model/align=chan"])
    with pytest.raises(CheckpointError, match="model.align._target_"):
        model.on_load_checkpoint(ckpt)


def test_training_only_differences_only_warn():
    gru = "itm.models.encoders.BiGRUTextEncoder"
    saved = {"text_encoder": {"_target_": gru, "word_aug": 0.0}, "embed_size": 8}
    current = {"text_encoder": {"_target_": gru, "word_aug": 0.2}, "embed_size": 8}
    with pytest.warns(UserWarning, match="model.text_encoder.word_aug was 0.0, this run uses 0.2"):
        check_model_config(saved, current)


def test_truncated_checkpoint(tmp_path, trained_ckpt):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(trained_ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=rf"checkpoint {bad} cannot be read \(truncated or"):
        load_checkpoint_file(bad)


def test_empty_checkpoint(tmp_path):
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty \\(0 bytes\\)"):
        load_checkpoint_file(bad)


def test_checkpoint_not_from_itm(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="holds no itm model config"):
        load_checkpoint_file(foreign)
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_checkpoint_file(foreign)


class _Pickled:  # a class weights_only loading refuses
    pass


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    bad = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": _Pickled()}}, bad)
    with pytest.raises(CheckpointError, match="pickled Python objects that weights_only"):
        load_checkpoint_file(bad)


def test_ckpt_path_missing(compose, tmp_path):
    from itm.train import train

    with pytest.raises(CheckpointError, match=r"ckpt_path=.*nope\.ckpt: no such file"):
        train(_cfg(compose, tmp_path, [f"ckpt_path={tmp_path / 'nope.ckpt'}"]))


def test_ckpt_path_last_without_runs(compose, tmp_path):
    from itm.train import train

    with pytest.raises(CheckpointError, match="ckpt_path=last: no run under .* checkpoints/last"):
        train(_cfg(compose, tmp_path, ["ckpt_path=last"]))


def test_ckpt_path_last_picks_the_newest_run(tmp_path):
    import os
    import time

    from itm.checkpoint import resolve_ckpt_path

    root = tmp_path / "train"
    paths = [
        root / "runs/2024-01-01/checkpoints/last.ckpt",
        root / "multiruns/2024-01-02/3/checkpoints/last.ckpt",
        root / "runs/2024-01-03/checkpoints/last.ckpt",
    ]
    now = time.time()
    for i, p in enumerate(paths):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (now + i, now + i))
    os.utime(paths[1], (now + 10, now + 10))  # the multirun job was written last
    assert resolve_ckpt_path("last", root) == str(paths[1])
    # this run's own directory is never its own resume source
    assert resolve_ckpt_path("last", root, exclude=paths[1].parents[1]) == str(paths[2])
    # a run directory resolves to its last.ckpt
    assert resolve_ckpt_path(paths[0].parents[1], root) == str(paths[0])


def test_invalid_precision_option(compose, tmp_path):
    from itm.train import train

    with pytest.raises(Exception, match="Precision 'fp17' is invalid"):
        train(_cfg(compose, tmp_path, ["trainer.precision=fp17"]))
