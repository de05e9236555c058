"""Both notebooks execute end to end on synthetic data (nbclient, tiny settings)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nbclient") is None or importlib.util.find_spec("ipykernel") is None,
    reason="needs the notebooks extra: pip install -e '.[notebooks]'",
)


def _execute(name: str, tmp_path, env: dict[str, str]):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _outputs(nb, kind: str) -> list:
    return [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})
    ]


def test_alignment_notebook(tmp_path):
    env = {
        "ITM_NB_HEADS": "scan,chan,global",
        "ITM_NB_EPOCHS": "1",
        "ITM_NB_N_TRAIN": "100",
        "OMP_NUM_THREADS": "1",
        "ITM_LOG_DIR": str(tmp_path),
    }
    nb = _execute("alignment.ipynb", tmp_path, env)
    assert len(_outputs(nb, "image/png")) == 3  # one attention picture per head
    tables = [o["data"]["text/markdown"] for o in _outputs(nb, "text/markdown")]
    assert sum("| rank |" in t for t in tables) == 3  # a top-k table per head


def test_compare_runs_notebook(tmp_path):
    env = {
        "ITM_NB_METHODS": "scan:lse;chan:lse",
        "ITM_NB_EPOCHS": "2",
        "ITM_NB_N_TRAIN": "100",
        "OMP_NUM_THREADS": "1",
        "ITM_LOG_DIR": str(tmp_path),
        "TMPDIR": str(tmp_path),
    }
    nb = _execute("compare_runs.ipynb", tmp_path, env)
    assert len(_outputs(nb, "image/png")) == 1  # the rsum curves
    (table,) = [o["data"]["text/markdown"] for o in _outputs(nb, "text/markdown")]
    assert "align=scan" in table and "align=chan" in table and "best dev rsum" in table
