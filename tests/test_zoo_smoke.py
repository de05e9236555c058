"""Every sensible head x pooling combination trains one short epoch through the CLI, and every
paper recipe composes and runs one short step (on the built-in synthetic data)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONF_DIR, ROOT, run_train_cli

# Tiny sizes: a few batches of a 32-d model.
FAST = [
    "debug=fast",
    "model.embed_size=32",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
]

# Head -> the poolings that make sense with it (BFAN pools by its own means).
COMBINATIONS = {
    "scan": ["avg", "lse", "max", "sum", "gpo"],
    "bfan": ["avg"],
    "chan": ["avg", "lse", "max", "sum", "gpo"],
    "imram": ["avg", "lse", "max", "gpo"],
    "global": ["avg", "max", "gpo"],
}

BIGRU = ["model.text_encoder.word_dim=16"]
RECIPES = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _is_variant(name: str) -> bool:
    """A recipe that only changes numbers of another one (``defaults: [<recipe>, _self_]``, e.g.
    ``scan_t2i_avg_coco``): it builds the same model, so its short run would repeat the other's."""
    import yaml

    node = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text()) or {}
    return any(isinstance(d, str) and d in RECIPES for d in node.get("defaults", []))


def _uses_bert(recipe: str) -> bool:
    """Whether the recipe's text encoder is a pretrained BERT (``bert`` or ``bert_cnn``): those need
    a local model ``path`` and have no ``word_dim`` (a variant: that of the recipe it includes)."""
    import yaml

    text = (CONF_DIR / "experiment" / f"{recipe}.yaml").read_text()
    bases = [d for d in (yaml.safe_load(text) or {}).get("defaults", []) if d in RECIPES]
    if bases:
        return _uses_bert(bases[0])
    return re.search(r"override /model/text_encoder: bert", text) is not None


BERT_RECIPES = [r for r in RECIPES if _uses_bert(r)]
BIGRU_RECIPES = [r for r in RECIPES if not _uses_bert(r)]
# variants are composed (test_every_recipe_composes) but not trained again
BERT_RUNS = [r for r in BERT_RECIPES if not _is_variant(r)]
BIGRU_RUNS = [r for r in BIGRU_RECIPES if not _is_variant(r)]


def _job_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in tmp_path.glob("train/multiruns/*/*") if p.is_dir())


@pytest.mark.parametrize("head", sorted(COMBINATIONS))
def test_head_trains_with_each_pooling(head, tmp_path):
    pools = COMBINATIONS[head]
    args = ["-m", f"model/align={head}", f"pooling={','.join(pools)}", *FAST, *BIGRU]
    run_train_cli(args, tmp_path, timeout=600)
    jobs = _job_dirs(tmp_path)
    assert len(jobs) == len(pools), jobs
    for job in jobs:
        with open(job / "csv" / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        rsums = [float(r["test/rsum"]) for r in rows if r.get("test/rsum")]
        assert len(rsums) == 1 and 0 <= rsums[0] <= 600
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        assert all(x == x for x in losses), f"NaN loss in {job}"
        assert (job / "checkpoints" / "best.ckpt").exists()


def test_every_recipe_composes(compose):
    from hydra.utils import instantiate

    assert len([r for r in RECIPES if r != "quickstart"]) >= 13
    for name in RECIPES:
        overrides = [f"experiment={name}"]
        if name in BERT_RECIPES:
            overrides.append("model.text_encoder.path=/nonexistent")
        cfg = compose(overrides)
        instantiate(cfg.model.align)
        instantiate(cfg.model.pooling)
        assert cfg.model.embed_size in (256, 1024, 2048)  # VSRN: 2048


@pytest.mark.parametrize("chunk", [0, 1])
def test_every_bigru_recipe_runs_a_short_step(chunk, tmp_path):
    names = BIGRU_RUNS[chunk::2]
    run_train_cli(
        ["-m", f"experiment={','.join(names)}", *FAST, *BIGRU, "data.batch_size=16"], tmp_path
    )
    assert len(_job_dirs(tmp_path)) == len(names)


def test_every_bert_recipe_runs_a_short_step(tmp_path, tiny_bert):
    args = ["-m", f"experiment={','.join(BERT_RUNS)}", *FAST, "data.batch_size=16"]
    # `++`: the multirun first composes without the sweep (bigru, no `path` key)
    run_train_cli([*args, f"++model.text_encoder.path={tiny_bert}"], tmp_path)
    assert len(_job_dirs(tmp_path)) == len(BERT_RUNS)


def test_plus_experiment_spelling_selects_the_recipe(tmp_path):
    """`+experiment=NAME` (the spelling of the public contract) works like `experiment=NAME`."""
    from itm.cli import normalize_argv

    assert normalize_argv(["train.py", "+experiment=chan_bigru", "+x=1"]) == [
        "train.py",
        "experiment=chan_bigru",
        "+x=1",
    ]
    env = {**os.environ, "ITM_LOG_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "+experiment=chan_bigru", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "itm.models.align.chan.CHAN" in proc.stdout and "margin: 0.05" in proc.stdout
