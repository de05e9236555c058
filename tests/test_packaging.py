"""itm as a package a researcher installs: the wheel carries the configs (as ``itm.conf``), the C
kernel source and the type marker; a NON-editable install into a fresh virtual environment runs
``itm-train --cfg job``, ``itm-train debug=fast`` and ``itm-eval ckpt_path=<its best.ckpt>`` from
an empty directory outside the checkout, and the README's Python API as written there.

The fresh-venv test installs torch and every dependency (minutes): marked ``slow`` (CI runs it).
The torch build is the one of this environment (``$TORCH_SPEC``, default the running torch's
version; ``$TORCH_INDEX`` an index to take it from), as ``make install`` does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import CONF_DIR, ROOT


def _source_copy(dest: Path) -> Path:
    """The checkout's files that git tracks or would track (no .venv, outputs, caches), copied
    to ``dest``: building there leaves the checkout untouched."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_carries_configs_kernel_source_and_entry_points(tmp_path):
    src = _source_copy(tmp_path / "src")
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path / "dist"), str(src)],
        tmp_path,
        dict(os.environ),
    )
    (wheel,) = (tmp_path / "dist").glob("itm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(meta).decode()
        entry = zf.read(meta.replace("METADATA", "entry_points.txt")).decode()
    yaml = {str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*.yaml")}
    assert yaml and {f"itm/conf/{p}" for p in yaml} <= names, sorted(yaml - names)
    assert {"itm/conf/__init__.py", "itm/models/align/_attend.c", "itm/py.typed"} <= names
    assert not [n for n in names if n.startswith(("conf/", "tests/", "bench/"))]
    for script in ("itm-train = itm.cli:train_main", "itm-eval = itm.cli:eval_main"):
        assert script in entry
    # the declared lower bounds (see pyproject.toml) and the extras built into `dev`
    for req in ("lightning<2.7,>=2.6", "torch>=2.4", "transformers>=5.3", "PyYAML>=6.0"):
        assert f"Requires-Dist: {req}" in metadata, req
    assert re.search(r"Requires-Dist: itm\[.*tensorboard.*\]; extra == \"dev\"", metadata)


def _readme_python_api() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python block under 'Python API'"
    return match.group(1)


@pytest.mark.slow
def test_fresh_venv_non_editable_install_runs_anywhere(tmp_path):
    import torch

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    bin_dir = env_dir / "bin"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH", "ITM_", "PYTEST"))
    }
    env.update(
        {
            "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "offline",
            "ITM_CACHE_DIR": str(tmp_path / "cache"),
        }
    )
    torch_spec = os.environ.get("TORCH_SPEC") or f"torch=={torch.__version__.split('+')[0]}"
    index = ["--index-url", os.environ["TORCH_INDEX"]] if os.environ.get("TORCH_INDEX") else []
    _run([str(py), "-m", "pip", "install", "-q", torch_spec, *index], tmp_path, env)
    src = _source_copy(tmp_path / "src")
    _run([str(py), "-m", "pip", "install", "-q", str(src)], tmp_path, env)  # NOT editable
    shutil.rmtree(src)  # the install must not need the source any more

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(py), "-c", "import itm, itm.conf; print(itm.__file__)"], work, env)
    assert str(env_dir) in where.stdout  # the installed copy, not a checkout

    cfg = _run([str(bin_dir / "itm-train"), "--cfg", "job"], work, env)
    assert "task_name: train" in cfg.stdout and re.search(
        r"_target_: itm\.models\.align\..*SCAN", cfg.stdout
    )

    fit = _run([str(bin_dir / "itm-train"), "debug=fast"], work, env)
    assert re.search(r"^rsum\s+\d+\.\d+$", fit.stdout, re.M), fit.stdout[-3000:]
    (best,) = work.glob("outputs/train/runs/*/checkpoints/best.ckpt")

    ev = _run([str(bin_dir / "itm-eval"), f"ckpt_path={best}"], work, env)
    for row in ("i2t", "t2i", "rsum"):
        assert re.search(rf"^{row}\s+\d+\.\d+", ev.stdout, re.M), ev.stdout[-3000:]
    assert list(work.glob("outputs/eval/runs/*/results.json"))

    (work / "api.py").write_text(_readme_python_api())
    api = _run([str(py), "api.py"], work, env)
    assert "rsum" in api.stdout, api.stdout[-3000:]
