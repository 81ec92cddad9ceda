"""The import contracts of .importlinter (docs/design.md, "Layers and what each may import"):
the tree keeps them, and `lint-imports` does fail on a forbidden import, naming it."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports", path=os.path.dirname(sys.executable))


def _lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root`, with its contracts file."""
    assert LINT_IMPORTS, "lint-imports is not installed: pip install -e '.[test]'"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo", str(root / ".importlinter")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def tree(tmp_path):
    """A copy of the package and its contracts, to break."""
    shutil.copytree(
        ROOT / "sora_jax", tmp_path / "sora_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_tree_keeps_every_contract():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_the_copy_is_what_is_checked(tree):
    proc = _lint_imports(tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "module, line, importer, imported, contract",
    [
        # A function-local import counts as much as one at the top.
        (
            "models/dit.py",
            "def _probe():\n    from sora_jax.training import loop  # noqa: F401\n",
            "sora_jax.models.dit",
            "sora_jax.training.loop",
            "models/ imports no training, data, evaluation, run or entry point",
        ),
        (
            "evaluation/metrics.py",
            "from sora_jax.training import step  # noqa: E402, F401\n",
            "sora_jax.evaluation.metrics",
            "sora_jax.training.step",
            "evaluation/ never imports training/",
        ),
        (
            "data/records.py",
            "from sora_jax.run import checkpoint  # noqa: E402, F401\n",
            "sora_jax.data.records",
            "sora_jax.run.checkpoint",
            "Layers",
        ),
    ],
)
def test_a_forbidden_import_breaks_the_contracts(tree, module, line, importer, imported, contract):
    path = tree / "sora_jax" / module
    path.write_text(path.read_text() + "\n\n" + line)
    proc = _lint_imports(tree)
    assert proc.returncode != 0, proc.stdout
    broken = [ln for ln in proc.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), proc.stdout
    assert f"{importer} -> {imported}" in proc.stdout, proc.stdout
