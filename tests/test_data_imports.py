"""The data layer's import structure: ``itm-prepare`` and the feature stores load neither torch
nor Lightning, and the modules of ``itm.data`` import each other without a cycle (function-level
imports included, which only hide one)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import itm.data

DATA_DIR = Path(itm.data.__file__).parent


def _heavy_modules_after(statement: str) -> list[str]:
    code = (
        f"{statement}\nimport sys\n"
        "print(' '.join(m for m in ('torch', 'lightning', 'h5py') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize(
    "statement",
    [
        "import itm.data.prepare",
        "from itm.data.prepare import main",
        "import itm.data.stores",
        "from itm.data.stores import open_npy_split, write_h5",
        "from itm.data import SPLITS, Vocabulary, DataError",
    ],
)
def test_prepare_and_stores_import_neither_torch_nor_lightning(statement):
    loaded = _heavy_modules_after(statement)
    assert "torch" not in loaded and "lightning" not in loaded, (statement, loaded)
    assert "h5py" not in loaded, (statement, loaded)  # h5py waits until a file is touched


def test_itm_prepare_help_runs_without_torch():
    code = (
        "import sys\nfrom itm.data.prepare import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pfan-positions" in proc.stdout


def _itm_data_imports(path: Path) -> set[str]:
    """Every ``itm.data.*`` module ``path`` imports, at any depth of the file (function bodies
    included; ``if TYPE_CHECKING:`` blocks excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m.startswith("itm.data.")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(DATA_DIR.parent.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_data_modules_import_without_a_cycle():
    graph = {
        _module_name(p): _itm_data_imports(p)
        for p in sorted(DATA_DIR.rglob("*.py"))
        if p.name != "__init__.py"
    }
    # a package import (``itm.data.stores``) stands for its __init__
    for init in DATA_DIR.rglob("__init__.py"):
        if init.parent != DATA_DIR:
            graph[_module_name(init)] = _itm_data_imports(init)
    cycles = []

    def walk(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt in graph and len(stack) < len(graph):
                walk(nxt, [*stack, nxt])

    for start in graph:
        walk(start, [start])
    assert not cycles, sorted(set(cycles))[:5]


def test_stores_do_not_import_the_datamodules():
    """The stores are the bottom layer: the DataModules read them, never the reverse."""
    for path in (DATA_DIR / "stores").glob("*.py"):
        imported = _itm_data_imports(path)
        assert not imported & {"itm.data.datamodule", "itm.data.precomp"}, (path.name, imported)


def test_old_import_paths_still_work():
    from itm.data import (
        FeatureSplit,
        FeatureStore,
        NpyImages,
        PrecompDataModule,
        h5store,
        open_npy_split,
        stores,
    )
    from itm.data.precomp import FeatureSplit as F2
    from itm.data.precomp import split_files

    assert F2 is FeatureSplit is stores.FeatureSplit
    assert NpyImages is stores.NpyImages and open_npy_split is stores.open_npy_split
    assert h5store.write_h5 is stores.write_h5 and h5store.H5Images is stores.H5Images
    assert split_files is stores.split_files and FeatureStore is stores.FeatureStore
    assert PrecompDataModule.__module__ == "itm.data.precomp"
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        itm.data.NoSuchThing  # noqa: B018


def test_all_names_every_lazy_export():
    assert sorted(itm.data.__all__) == sorted(itm.data._WHERE)
    for name in itm.data.__all__:
        assert getattr(itm.data, name) is not None
