"""Every file itm writes goes through :mod:`itm.io` (one implementation of atomic writing): a
writer interrupted by an exception leaves neither a partial file under the final name, nor a
temporary file beside it, and an earlier complete file stays as it was."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

import itm
from itm.data import Vocabulary
from itm.data.stores.hdf5 import open_h5_split, write_h5

SRC = Path(itm.__file__).parent


class Interrupted(Exception):
    pass


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class FailingImages:
    """Array-like [N, K, D] that raises when the rows from ``fail_at`` on are read (after the
    writer has already written the rows before them)."""

    def __init__(self, n: int, fail_at: int, exc: type[BaseException] = Interrupted) -> None:
        self.shape = (n, 3, 4)
        self.fail_at, self.exc = fail_at, exc

    def __getitem__(self, idx: slice) -> np.ndarray:
        if idx.stop > self.fail_at:
            raise self.exc(f"read of rows {idx.start}..{idx.stop} interrupted")
        return np.ones((idx.stop - idx.start, 3, 4), np.float32)


@pytest.mark.parametrize("exc", [Interrupted, KeyboardInterrupt])
def test_hdf5_writer_interrupted_mid_copy_leaves_nothing(tmp_path, exc):
    caps = [f"caption {i}" for i in range(8)]
    with pytest.raises(exc):
        write_h5(
            tmp_path / "train.h5", FailingImages(8, 5, exc), caps, np.arange(8), chunk_images=2
        )
    assert _listing(tmp_path) == []


def test_hdf5_writer_interrupted_keeps_the_previous_file(tmp_path):
    dest = tmp_path / "train.h5"
    caps = [f"caption {i}" for i in range(8)]
    write_h5(dest, np.zeros((8, 3, 4), np.float32), caps, np.arange(8))
    before = dest.read_bytes()
    with pytest.raises(Interrupted):
        write_h5(dest, FailingImages(8, 5), caps, np.arange(8), chunk_images=2)
    assert _listing(tmp_path) == ["train.h5"] and dest.read_bytes() == before
    assert open_h5_split(dest).captions == caps


def test_vocab_writer_interrupted_keeps_the_previous_file(tmp_path, monkeypatch):
    dest = tmp_path / "x_vocab.json"
    Vocabulary.build(["a dog", "a cat"], threshold=1).to_json(dest)
    before = dest.read_bytes()

    def half_dump(obj, fh, **kw):
        fh.write(json.dumps(obj)[:10])
        raise Interrupted("disk full")

    monkeypatch.setattr(json, "dump", half_dump)
    with pytest.raises(Interrupted):
        Vocabulary.build(["a bird"], threshold=1).to_json(dest)
    assert _listing(tmp_path) == ["x_vocab.json"] and dest.read_bytes() == before


def test_eval_results_interrupted_at_the_rename_leave_no_temporary(compose, tmp_path, monkeypatch):
    """``eval.py`` on a saved matrix: a failing rename (e.g. the disk went away) leaves the
    results of the earlier evaluation and no temporary file (before the fix ``.results.json.tmpPID``
    stayed behind)."""
    from itm.evaluate import evaluate

    n_img = 20
    sims = np.random.default_rng(0).standard_normal((n_img, 5 * n_img)).astype(np.float32)
    np.save(tmp_path / "m.npy", sims)
    out = tmp_path / "out"
    cfg = compose([f"eval.output_dir={out}", f"eval.matrices=[{tmp_path / 'm.npy'}]"], "eval")
    evaluate(cfg)
    before = {name: (out / name).read_bytes() for name in _listing(out)}
    assert set(before) == {"results.json", "results.md"}

    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name.startswith("results"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    sims[0] += 1.0
    np.save(tmp_path / "m.npy", sims)
    with pytest.raises(OSError, match="No space left"):
        evaluate(cfg)
    assert _listing(out) == sorted(before)
    assert all((out / name).read_bytes() == data for name, data in before.items())


def _writes_outside_itm_io(path: Path) -> list[str]:
    """Calls in ``path`` that write or rename files directly (``os.replace``, ``os.rename``,
    ``tempfile.mkstemp`` / ``NamedTemporaryFile``, ``Path.write_text`` / ``write_bytes``,
    ``open(..., "w...")``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        direct = ("os.replace", "os.rename", "tempfile.mkstemp", "tempfile.NamedTemporaryFile")
        if name in direct or name.endswith((".write_text", ".write_bytes")):
            found.append(f"{path.name}:{node.lineno} {name}")
        elif name == "open" and len(node.args) > 1:
            mode = ast.unparse(node.args[1])
            if any(c in mode for c in "wx"):
                found.append(f"{path.name}:{node.lineno} open({mode})")
    return found


def test_no_writer_bypasses_itm_io():
    """One implementation of atomic writing: nothing under src/itm renames or writes a file
    itself (itm.io excepted; the kernel build's file lock is opened for append, not written)."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "io.py" and path.parent == SRC:
            continue
        offenders += _writes_outside_itm_io(path)
    assert not offenders, offenders
