"""Test-wide setup: offline environment, float32 warm-up, fixtures and Hydra helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "data" / "fixtures"
CONF_DIR = ROOT / "conf"


def _warm_up_float32() -> None:
    """docs/numerics.md: the first exp/log/sqrt/tanh/pow after a matrix product in a fresh
    2-thread process can be off by 3e-4 relative in float32; a warm-up call avoids it."""
    a = torch.randn(1024, 1024)
    b = a @ a
    for fn in (torch.exp, torch.log1p, torch.sqrt, torch.tanh, lambda x: x.pow(0.5)):
        fn(b.abs() * 1e-3)


_warm_up_float32()


def run_train_cli(
    args: Sequence[str],
    tmp_path: Path,
    *,
    log_dir: Path | None = None,
    timeout: int = 300,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``python train.py *args`` in ``tmp_path`` (outputs under ``log_dir``, default
    ``tmp_path``; one thread, W&B offline); with ``check`` assert that it succeeded."""
    env = {
        **os.environ,
        "ITM_LOG_DIR": str(log_dir or tmp_path),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def load_fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture
def compose():
    """``compose(overrides) -> DictConfig`` of ``conf/train.yaml`` (Hydra state cleared)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def _compose(overrides: list[str] | None = None, config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return hydra_compose(config_name, overrides=overrides or [])

    yield _compose
    GlobalHydra.instance().clear()


TINY_BERT_WORDS = ["a", "the", "man", "woman", "dog", "cat", "red", "blue", "is", "on", "with"]


def write_tiny_bert(
    directory: Path, words: list[str] | None = None, tokenizer_files: bool = True
) -> Path:
    """A randomly initialised tiny BERT (2 layers, hidden 32) with its own vocab file, saved in
    the layout ``BertModel`` / ``BertTokenizer.from_pretrained(dir)`` read offline; with
    ``tokenizer_files=False`` only ``vocab.txt`` describes the tokenizer (no config files)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(words or [])]
    vocab += [w for w in TINY_BERT_WORDS if w not in vocab]
    # every synthetic-data word too, so that real captions do not tokenize to [UNK]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    if tokenizer_files:
        tok = BertTokenizer(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
        tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny BERT directory whose vocabulary covers the synthetic data's words."""
    from itm.data import SyntheticDataModule

    dm = SyntheticDataModule(n_train=64, n_dev=16, n_test=16)
    words = sorted(dm.vocab.word2idx)[4:] if hasattr(dm.vocab, "word2idx") else []
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), [w for w in words if w.isalnum()])
