"""``eval.py`` / ``itm.evaluate``: checkpoints rebuilt from their config, the run's data found,
results written, ensembles of checkpoints and of saved matrices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import ROOT
from itm.evaluate import evaluate, load_checkpoint
from itm.metrics import ensemble, recall_at_k
from itm.models.module import ITMModule
from itm.train import build_datamodule

TINY = [
    "model.embed_size=32",
    "model.text_encoder.word_dim=16",
    "data.n_train=50",
    "data.n_dev=10",
    "data.n_test=20",
]


def _make_run(compose, root: Path, seed: int, overrides=()) -> Path:
    """A fake training run folder: .hydra/config.yaml + checkpoints/best.ckpt."""
    cfg = compose(TINY + list(overrides))
    build_datamodule(cfg)  # fills vocab_size / img_dim into cfg.model
    torch.manual_seed(seed)
    model = ITMModule(OmegaConf.to_container(cfg.model, resolve=True))
    run = root / f"run{seed}"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml", resolve=False)
    ckpt = run / "checkpoints" / "best.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    return ckpt


def _eval_cfg(compose, out: Path, overrides):
    cfg = compose([f"eval.output_dir={out}", *overrides], config_name="eval")
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    root = tmp_path_factory.mktemp("runs")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        a = _make_run(lambda o: hydra_compose("train", overrides=o), root, 1)
        b = _make_run(lambda o: hydra_compose("train", overrides=o), root, 2, ["model/align=chan"])
    GlobalHydra.instance().clear()
    return a, b


def test_single_checkpoint_writes_results(compose, runs, tmp_path):
    ckpt, _ = runs
    cfg = _eval_cfg(compose, tmp_path, [f"ckpt_path={ckpt}", "eval.save_matrix=true"])
    metrics = evaluate(cfg)
    assert set(metrics) >= {"f30k/rsum", "f30k/i2t_r1", "f30k/t2i_meanr"}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"] == "f30k" and saved["shape"] == [20, 100]
    assert saved["results"]["f30k"]["rsum"] == metrics["f30k/rsum"]
    assert "| f30k |" in (tmp_path / "results.md").read_text()
    sims = np.load(tmp_path / "sims_0.npy")
    assert recall_at_k(sims)["rsum"] == pytest.approx(metrics["f30k/rsum"])
    # the saved matrix is the direct Similarity result of the encoded split
    model = load_checkpoint(ckpt)
    assert model.similarity.align.__class__.__name__ == "SCAN"
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes leave no temporaries


def test_ensemble_of_checkpoints_and_saved_matrices(compose, runs, tmp_path):
    a, b = runs
    one = tmp_path / "one"
    evaluate(_eval_cfg(compose, one, [f"ckpt_path=[{a},{b}]", "eval.save_matrix=true"]))
    m0, m1 = np.load(one / "sims_0.npy"), np.load(one / "sims_1.npy")
    got = json.loads((one / "results.json").read_text())["results"]["f30k"]
    want = recall_at_k(ensemble([m0, m1]))
    assert got == pytest.approx(want)
    # the same ensemble from the saved matrices alone
    two = tmp_path / "two"
    metrics = evaluate(
        _eval_cfg(compose, two, [f"eval.matrices=[{one / 'sims_0.npy'},{one / 'sims_1.npy'}]"])
    )
    assert metrics["f30k/rsum"] == pytest.approx(want["rsum"])


def test_protocol_alias_and_coco_folds(compose, runs, tmp_path):
    ckpt, _ = runs
    cfg = _eval_cfg(
        compose, tmp_path, [f"ckpt_path={ckpt}", "protocol=coco1k+5k", "eval.fold_images=4"]
    )
    metrics = evaluate(cfg)
    assert {"coco1k/rsum", "coco5k/rsum"} <= set(metrics)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["split"] == "testall" and len(saved["results"]["coco1k"]["folds"]) == 5


def test_errors_are_clear(compose, tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(_eval_cfg(compose, tmp_path, []))
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(_eval_cfg(compose, tmp_path, ["protocol=f8k", "ckpt_path=x.ckpt"]))
    with pytest.raises(FileNotFoundError):
        evaluate(_eval_cfg(compose, tmp_path, ["ckpt_path=missing.ckpt", "data=synthetic"]))


@pytest.mark.slow
def test_eval_py_cli(runs, tmp_path):
    ckpt, _ = runs
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            f"ckpt_path={ckpt}",
            f"eval.output_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "rsum" in res.stdout and (tmp_path / "results.json").is_file()
