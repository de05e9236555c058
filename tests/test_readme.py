"""The README's statements that can be checked mechanically match the code and the tests."""

from __future__ import annotations

import ast
import re

import pytest
import yaml

from conftest import CONF_DIR, ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
TESTS = ROOT / "tests"
CAPTIONS_PER_IMAGE = 5  # Flickr30K / COCO (the precomp layout of the README)


def _code_blocks() -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)


def test_dev_split_size_is_stated_as_the_data_module_uses_it():
    """The dev split is the first ``n_dev`` images and their 5 captions each (SCAN's 1000 /
    5000); the README once said "first 5000 images"."""
    n_dev = yaml.safe_load((CONF_DIR / "data" / "precomp.yaml").read_text())["n_dev"]
    import inspect

    from itm.data import PrecompDataModule

    assert inspect.signature(PrecompDataModule).parameters["n_dev"].default == n_dev
    claims = re.findall(r"first (\d+) images / (\d+) captions", README)
    assert claims, "the README states the dev split's size"
    for images, captions in claims:
        assert (int(images), int(captions)) == (n_dev, CAPTIONS_PER_IMAGE * n_dev)
    for images in re.findall(r"dev[^.\n]*first (\d+)\b(?! images / )", README):
        assert int(images) == n_dev, images
    assert not re.search(r"first \d+ images(?! /)[^\n]*as SCAN", README)


def test_config_options_named_in_the_readme_exist():
    """Every ``group=option`` of the README's commands is a file ``conf/<group>/<option>.yaml``."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    groups |= {f"model/{p.name}" for p in (CONF_DIR / "model").iterdir() if p.is_dir()}
    seen = 0
    for block in _code_blocks():
        for group, option in re.findall(r"(?:^|\s)\+?([a-z_/]+)=([A-Za-z0-9_,]+)", block):
            if group not in groups:
                continue
            for name in option.split(","):
                seen += 1
                assert (CONF_DIR / group / f"{name}.yaml").is_file(), f"{group}={name}"
    assert seen >= 10


def _function_source(path, name: str) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return ast.unparse(fn)


@pytest.mark.parametrize(
    "test",
    [
        "test_resume_in_process_matches_uninterrupted",
        "test_sigkill_mid_epoch_then_resume_matches_uninterrupted",
    ],
)
def test_bit_for_bit_resume_is_what_the_resume_tests_check(test):
    """The README says resume is "tested bit-for-bit on CPU": the resume tests compare metrics,
    weights and optimizer state exactly, with no tolerance."""
    assert "tested bit-for-bit on CPU" in README
    source = _function_source(TESTS / "test_resume.py", test)
    assert "approx(" not in source and "assert_close(" not in source, test
    assert "torch.equal(" in source


def test_atomic_write_claims_name_the_code_that_makes_them_true():
    """ "written atomically" for the HDF5 store and eval.py's results: both write through
    itm.io, and tests/test_atomic_writers.py exercises interrupted writers."""
    assert "written atomically" in README and "test_atomic_writers.py" in README
    for module in ("src/itm/data/stores/hdf5.py", "src/itm/evaluate.py", "src/itm/data/vocab.py"):
        text = (ROOT / module).read_text(encoding="utf-8")
        assert "from itm.io import atomic_" in text, module
    assert (TESTS / "test_atomic_writers.py").is_file()
