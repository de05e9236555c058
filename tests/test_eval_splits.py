"""``eval.py`` reads and validates only the split it evaluates: never the train split (a
NaN-scan of ~33 GB on COCO), and each split once however many checkpoints are ensembled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

import itm.data.precomp as precomp
from itm.evaluate import evaluate
from itm.models.module import ITMModule
from itm.train import build_datamodule
from precomp_utils import write_precomp

TINY = ["model.embed_size=16", "model.text_encoder.word_dim=8"]


def _run(compose, data_root: Path, run: Path, seed: int, data_from: str) -> Path:
    """A run folder (.hydra/config.yaml with data=precomp, checkpoints/best.ckpt)."""
    over = [*TINY, "data=precomp", f"data.root={data_root}", "data.n_dev=8"]
    if data_from == "run_config_with_splits":  # the run validated its three splits up front
        over.append("data.splits=[train,dev,test]")
    cfg = compose(over)
    build_datamodule(cfg)  # fills vocab_size / img_dim into cfg.model
    torch.manual_seed(seed)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
        if data_from == "old_run_config":  # written before data.splits existed
            del cfg.data["splits"]
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml", resolve=True)
    ckpt = run / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    return ckpt


@pytest.fixture
def opened(monkeypatch):
    """The splits opened (read + validated) by the precomp data module, in order."""
    seen: list[str] = []
    real = precomp.open_npy_split

    def spy(root, split, *args, **kwargs):
        seen.append(split)
        return real(root, split, *args, **kwargs)

    monkeypatch.setattr(precomp, "open_npy_split", spy)
    return seen


@pytest.mark.parametrize(
    "data_from", ["run_config", "run_config_with_splits", "old_run_config", "command_line"]
)
def test_eval_never_reads_the_train_split(compose, tmp_path, opened, data_from):
    data = write_precomp(tmp_path / "data", {"train": 12, "dev": 8, "test": 8})
    ckpts = [_run(compose, data, tmp_path / f"run{i}", i, data_from) for i in (1, 2)]
    # the train features become garbage: NaN rows, then a file that is not even .npy
    ims = np.load(data / "train_ims.npy")
    ims[0, 0, 0] = np.nan
    np.save(data / "train_ims.npy", ims)
    (data / "train_ims.npy").write_bytes(b"not an npy file at all")
    opened.clear()
    over = [f"ckpt_path=[{ckpts[0]},{ckpts[1]}]", f"eval.output_dir={tmp_path / 'out'}"]
    if data_from == "command_line":
        over += ["data=precomp", f"data.root={data}"]
    metrics = evaluate(compose(over, config_name="eval"))
    assert np.isfinite(metrics["f30k/rsum"])
    assert "train" not in opened and "dev" not in opened, opened
    assert opened == ["test"], f"the test split is opened once for the ensemble: {opened}"
