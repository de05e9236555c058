"""One checkpoint reader (``itm.checkpoint.read_checkpoint_file``) for eval, resume and the
notebooks: ``weights_only=True`` only, never a full-unpickling fallback, and a one-line error
naming the file and ``itm-prepare convert`` for anything that is not an itm checkpoint."""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from itm.checkpoint import AtomicCheckpointIO, CheckpointError, load_checkpoint_file
from itm.evaluate import load_checkpoint
from itm.models.module import ITMModule

TINY = ["model.embed_size=8", "model.text_encoder.word_dim=4", "data.n_train=20"]


@pytest.fixture
def tiny_model(compose) -> ITMModule:
    from omegaconf import OmegaConf

    from itm.train import build_datamodule

    cfg = compose(TINY)
    build_datamodule(cfg)  # fills vocab_size / img_dim into cfg.model
    torch.manual_seed(0)
    return ITMModule(OmegaConf.to_container(cfg.model, resolve=True))


@pytest.fixture
def no_full_unpickling(monkeypatch):
    """Fail the test if anything calls ``torch.load(..., weights_only=False)``."""
    real = torch.load
    calls: list[object] = []

    def guarded(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        if kwargs.get("weights_only") is False:
            raise AssertionError("torch.load(weights_only=False) was called")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    return calls


def _foreign_files(tmp: Path) -> dict[str, Path]:
    files = {}
    files["random_pickle"] = tmp / "random.ckpt"
    files["random_pickle"].write_bytes(pickle.dumps({"weights": [1, 2, 3], "note": "hello"}))
    files["plain_dict"] = tmp / "plain.pt"
    torch.save({"encoder.w": torch.zeros(2), "epoch": 3}, files["plain_dict"])
    files["lightning_no_cfg"] = tmp / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 1}, files["lightning_no_cfg"])
    files["authors_unknown"] = tmp / "model_best.pth.tar"
    torch.save(
        {"model": [{"x": torch.zeros(1)}], "opt": argparse.Namespace(foo=1)},
        files["authors_unknown"],
        _use_new_zipfile_serialization=False,
    )
    return files


@pytest.mark.parametrize(
    "kind",
    ["random_pickle", "plain_dict", "lightning_no_cfg", "authors_unknown"],
)
def test_eval_refuses_a_foreign_file_in_one_line(tmp_path, kind, no_full_unpickling):
    path = _foreign_files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg, msg
    assert "itm-prepare convert" in msg, msg
    assert False not in no_full_unpickling


@pytest.mark.parametrize("kind", ["plain_dict", "lightning_no_cfg", "authors_unknown"])
def test_resume_reads_through_the_same_reader(tmp_path, kind, no_full_unpickling):
    """Lightning's resume loads through the trainer's AtomicCheckpointIO: the same checks."""
    path = _foreign_files(tmp_path)[kind]
    for read in (lambda p: AtomicCheckpointIO().load_checkpoint(p), load_checkpoint_file):
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*itm-prepare convert"):
            read(path)
    with pytest.raises(CheckpointError, match="only with weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)


@pytest.mark.parametrize("extra", [False, True], ids=["plain", "with_namespace"])
def test_an_itm_checkpoint_reads_everywhere(tmp_path, tiny_model, extra, no_full_unpickling):
    """Also one that carries an ``argparse.Namespace`` (e.g. a converted run's options): the
    old eval loader fell back to ``torch.load(weights_only=False)`` for it."""
    path = tmp_path / "itm.ckpt"
    hparams = dict(tiny_model.hparams)
    if extra:
        hparams["opt"] = argparse.Namespace(lr=2e-4)
    torch.save({"state_dict": tiny_model.state_dict(), "hyper_parameters": hparams}, path)
    loaded = load_checkpoint(path)
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    ckpt = AtomicCheckpointIO().load_checkpoint(path)
    assert set(ckpt["state_dict"]) == set(tiny_model.state_dict())
    assert False not in no_full_unpickling


def test_no_source_loads_with_full_unpickling():
    """No module, script or notebook calls torch.load(weights_only=False) or Lightning's
    load_from_checkpoint (which would bypass the reader)."""
    texts = {p: p.read_text() for p in (ROOT / "src").rglob("*.py")}
    texts.update({p: p.read_text() for p in ROOT.glob("*.py")})
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        texts[nb] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    for path, text in texts.items():
        assert not re.search(r"torch\.load\([^)]*weights_only\s*=\s*False", text), path
        assert "load_from_checkpoint(" not in text, path
