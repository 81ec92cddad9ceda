"""Fixtures shared by the training tests."""

import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def code(tmp_path_factory):
    """One copy of the code for the processes a test starts (`python -m sora_jax.train` run
    from it imports it): an edit to the tree while a test runs cannot make the runs it
    compares compile different steps (a resume then differs in the last bits)."""
    root = tmp_path_factory.mktemp("code")
    for name in ("sora_jax", "experiments"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root
