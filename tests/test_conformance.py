"""Every configured head and pooling passes the conformance checks of ``tests/conformance.py``.

The components are discovered from their config files, so a new head is tested by adding its
``conf/model/align/<name>.yaml``. The suite is also shown to catch what it is for: a throwaway
head added as one file plus one config is picked up and passes, and every existing head with its
padding mask removed fails.
"""

from __future__ import annotations

import shutil
import sys
import textwrap

import pytest
import torch

import conformance as C

HEADS = C.discover("model/align")
POOLINGS = [p for p in C.discover("pooling") if p != "none"]
IMAGE_ENCODERS = C.discover("model/image_encoder")
TEXT_ENCODERS = C.discover("model/text_encoder")


@pytest.fixture(scope="module", params=HEADS)
def head(request):
    return C.build_head(request.param)


@pytest.mark.parametrize("check", C.HEAD_CHECKS, ids=lambda c: c.__name__)
def test_head(head, check):
    check(head)


@pytest.mark.parametrize("name", POOLINGS)
def test_pooling(name):
    C.check_pooling(C.build_pooling(name))


@pytest.mark.parametrize("name", IMAGE_ENCODERS)
def test_image_encoder(name):
    C.check_image_encoder(C.build_encoder("image_encoder", name))


@pytest.mark.parametrize("name", TEXT_ENCODERS)
def test_text_encoder(name, tiny_bert):
    fields = {}
    with C.hydra_config() as compose:
        node = compose([f"model/text_encoder={name}"]).model.text_encoder
    # a pretrained encoder reads a local directory (the tiny test BERT); `in` on a DictConfig
    # is False for a mandatory ??? value, so look at the keys
    if "path" in list(node.keys()):
        fields["path"] = str(tiny_bert)
    C.check_text_encoder(C.build_encoder("text_encoder", name, **fields))


def test_every_shipped_component_is_discovered():
    assert {"scan", "bfan", "chan", "imram", "global"} <= set(HEADS)
    assert {"lse", "avg", "max", "sum", "gpo"} <= set(POOLINGS)
    assert {"fc", "mlp"} <= set(IMAGE_ENCODERS) and {"bigru", "bert"} <= set(TEXT_ENCODERS)


def test_a_head_that_understates_its_workspace_fails(monkeypatch):
    sim = C.build_head("scan")
    monkeypatch.setattr(type(sim.align), "bytes_per_pair", lambda self, k, n, e: k * n * e // 8)
    with pytest.raises(AssertionError, match="declared"):
        C.check_workspace(sim)


def _unmasked(sim):
    """The same head with its padding masks removed (every slot treated as valid)."""
    head = sim.align

    class Unmasked(type(head)):
        def forward(self, img, img_mask, cap, cap_mask, pooling=None):
            ones_i, ones_c = torch.ones_like(img_mask), torch.ones_like(cap_mask)
            return super().forward(img, ones_i, cap, ones_c, pooling)

    head.__class__ = Unmasked
    return sim


@pytest.mark.parametrize("name", HEADS)
def test_a_head_without_its_padding_mask_fails_the_suite(name):
    broken = _unmasked(C.build_head(name))
    failures = []
    for check in C.HEAD_CHECKS:
        try:
            check(broken)
        except AssertionError:
            failures.append(check.__name__)
    assert "check_garbage_padding" in failures, failures


THROWAWAY = '''
"""A throwaway head: the mean over words of each word's best cosine with a region."""

import torch
from itm.models.align.base import AlignHead
from itm.models.pooling import AvgPool


class MeanBest(AlignHead):
    pooling_role = "fixed"
    fixed_pooling = (AvgPool,)
    fixed_pooling_name = "the mean"

    def forward(self, img, img_mask, cap, cap_mask, pooling=None):
        s = torch.einsum("ikd,jld->ijlk", img, cap)
        s = s.masked_fill(~img_mask[:, None, None, :], float("-inf")).amax(dim=-1)
        s = torch.where(cap_mask[None], s, s.new_zeros(()))
        return s.sum(-1) / cap_mask.sum(-1)[None].to(s.dtype)

    def alignment(self, img, cap):
        return (cap @ img.T).softmax(dim=-1)

    def bytes_per_pair(self, n_regions, n_words, elem_size):
        return 3 * n_regions * n_words * elem_size
'''


def test_a_new_head_is_picked_up_from_one_file_and_one_config(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(C.CONF_DIR, conf)
    (tmp_path / "throwaway_head.py").write_text(textwrap.dedent(THROWAWAY))
    (conf / "model" / "align" / "mean_best.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /pooling: avg\n"
        "model:\n  align:\n    _target_: throwaway_head.MeanBest\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "mean_best" in C.discover("model/align", conf)
    sim = C.build_head("mean_best", conf)
    C.check_head(sim)
    sys.modules.pop("throwaway_head", None)


@pytest.mark.parametrize(
    ("kind", "name"),
    [("image_encoder", n) for n in IMAGE_ENCODERS] + [("text_encoder", n) for n in TEXT_ENCODERS],
)
def test_an_encoder_is_built_in_train_mode(kind, name, tiny_bert):
    """Lightning keeps each submodule's mode through training: a part built in eval mode (a
    pretrained model's from_pretrained) would train without its dropout."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    with C.hydra_config() as compose:
        node = compose([f"model/{kind}={name}", f"model.embed_size={C.D}"]).model[kind]
        with open_dict(node):
            for key, value in {"img_dim": C.IMG_DIM, "vocab_size": C.VOCAB}.items():
                if key in node:
                    node[key] = value
            if "path" in list(node.keys()):
                node["path"] = str(tiny_bert)
        enc = instantiate(node)
    assert all(m.training for m in enc.modules()), [
        type(m).__name__ for m in enc.modules() if not m.training
    ]
