"""Benchmark scripts run as `python benchmarks/NAME.py`, which puts benchmarks/ first on
sys.path: a script named like a standard-library module would replace it for every other
script (a `tokenize.py` there broke jax's import of `linecache`)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_no_benchmark_shadows_the_standard_library():
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    assert len(names) >= 5
    assert not set(names) & sys.stdlib_module_names, set(names) & sys.stdlib_module_names


def test_a_benchmark_script_starts():
    proc = subprocess.run(
        [sys.executable, "benchmarks/tokenizer.py", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--clip" in proc.stdout
