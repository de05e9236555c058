"""Resume's config check: training-only options come from the classes' schema
(``training_only_options``, :mod:`itm.models.schema`), ``_target_`` is compared as a class."""

from __future__ import annotations

import inspect
import warnings

import pytest
import yaml

from conftest import ROOT
from itm.checkpoint import CheckpointError, check_model_config, config_differences
from itm.models.schema import resolve_target, training_only_options

FC = "itm.models.encoders.FCImageEncoder"
BERT = "itm.models.encoders.BertTextEncoder"


def _cfg(**over):
    cfg = {
        "embed_size": 8,
        "image_encoder": {"_target_": FC, "img_dim": 6, "norm": True, "region_drop": 0.0},
        "text_encoder": {"_target_": BERT, "path": "/data/bert", "lr_mult": 0.1, "word_aug": 0.0},
        "align": {"_target_": "itm.models.align.scan.SCAN", "lambda_softmax": 9.0},
    }
    for dotted, value in over.items():
        node, leaf = dotted.split("__", 1) if "__" in dotted else (None, dotted)
        (cfg[node] if node else cfg)[leaf] = value
    return cfg


@pytest.mark.parametrize(
    "key, value",
    [
        ("image_encoder__region_drop", 0.2),  # a recipe's size augmentation
        ("text_encoder__path", "/moved/bert"),  # the BERT directory moved
        ("text_encoder__lr_mult", 0.05),
        ("text_encoder__word_aug", 0.2),
    ],
)
def test_training_only_options_warn(key, value):
    current = _cfg(**{key: value})
    with pytest.warns(UserWarning, match=key.replace("__", ".", 1)):
        check_model_config(_cfg(), current)


@pytest.mark.parametrize(
    "key, value",
    [
        ("embed_size", 16),
        ("image_encoder__norm", False),  # same class, an option that changes the model
        ("image_encoder__img_dim", 7),
        ("align__lambda_softmax", 4.0),
        ("align___target_", "itm.models.align.chan.CHAN"),
    ],
)
def test_architecture_differences_refuse(key, value):
    with pytest.raises(CheckpointError, match=key.replace("__", ".", 1)):
        check_model_config(_cfg(), _cfg(**{key: value}))


def test_a_training_only_name_on_another_class_refuses():
    """``region_drop`` is training-only for the encoder that declares it; when the image
    encoder's class changes, the whole node is architecture."""
    current = _cfg(image_encoder__region_drop=0.2)
    current["image_encoder"]["_target_"] = "itm.models.encoders.GCNImageEncoder"
    with pytest.raises(CheckpointError, match="image_encoder._target_"):
        check_model_config(_cfg(), current)


def test_target_compared_as_class():
    """A package re-export of the same class is no difference."""
    current = _cfg(align___target_="itm.models.align.SCAN")
    current["image_encoder"]["_target_"] = "itm.models.encoders.image.FCImageEncoder"
    assert resolve_target("itm.models.align.SCAN") is resolve_target("itm.models.align.scan.SCAN")
    assert config_differences(_cfg(), current) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_model_config(_cfg(), current)


def _conf_targets() -> set[str]:
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.add(node["_target_"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for path in (ROOT / "conf" / "model").rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return found


def test_declared_options_are_constructor_parameters():
    """The schema cannot drift: every declared name is a parameter of the class it marks, and
    every configured augmentation / dropout / lr multiplier / path option is declared."""
    targets = _conf_targets()
    assert FC in targets and BERT in targets
    for target in sorted(targets):
        cls = resolve_target(target)
        assert cls is not None, target
        if not isinstance(cls, type):
            continue
        params = set(inspect.signature(cls.__init__).parameters) - {"self"}
        declared = training_only_options(cls)
        assert declared <= params, (target, declared - params)
        for name in params:
            if name.endswith(("_aug", "_drop", "dropout", "lr_mult", "_path")) or name == "path":
                assert name in declared, f"{target}.{name} is not declared training-only"
