"""The notebooks of notebooks/: each `.py` (jupytext percent, the source) matches its stored
`.ipynb` (outputs stripped), takes its paths from one `parameters` cell, and runs headless
from top to bottom against a tiny run, a 2-job sweep and their dataset.

The PNGs of docs/notebooks/ come from the same execution against a longer run:

    python tests/test_notebooks.py --run=RUN --sweep=SWEEP_ROOT --data=DATASET \
        --figures=docs/notebooks
"""

import argparse
import base64
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

jupytext = pytest.importorskip("jupytext", reason="pip install -e '.[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[notebooks]'")
nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[notebooks]'")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = sorted(p.stem for p in NOTEBOOKS.glob("*.py"))
DEMO = str(ROOT / "experiments" / "demo.py")
# One CPU device per process (the conftest's 8 fake devices only slow these runs down) and
# no progress bars in captured output.
ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "TQDM_DISABLE": "1"}
CACHE = f"--compilation_cache={ROOT / '.jax_cache'}"
PROMPTS = ("a red circle moving up quickly", "a blue square moving left slowly")


def _cell(cell) -> tuple:
    return cell.cell_type, cell.source, dict(cell.metadata)


def test_the_four_notebooks_are_there():
    assert NAMES == ["compare_sweep", "explore_run", "inspect_data", "sample_playground"]


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_is_the_py_converted_and_has_no_outputs(name):
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    stored = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert [_cell(c) for c in stored.cells] == [_cell(c) for c in source.cells], (
        f"notebooks/{name}.ipynb is out of date with its .py: run "
        f"jupytext --to ipynb notebooks/{name}.py"
    )
    assert stored.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    for cell in stored.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"notebooks/{name}.ipynb is stored with outputs: jupytext --to ipynb "
                f"notebooks/{name}.py writes it without"
            )


@pytest.mark.parametrize("name", NAMES)
def test_paths_come_from_one_parameters_cell(name):
    cells = jupytext.read(NOTEBOOKS / f"{name}.py").cells
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: exactly one cell must carry the `parameters` tag"
    variables = re.findall(r'os\.environ\.get\("(SORA_\w+)"', cells[tagged[0]].source)
    assert variables, f"{name}: the parameters cell reads no SORA_* environment variable"
    # Nothing after the parameters cell reads the environment: one place to set paths.
    for cell in cells[tagged[0] + 1 :]:
        assert "os.environ" not in cell.source, f"{name}: a cell reads os.environ:\n{cell.source}"


# --- Executing the notebooks ----------------------------------------------------------


def _entry(module: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", f"sora_jax.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **ENV},
    )
    assert proc.returncode == 0, f"sora_jax.{module} {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


SWEEP_EXPERIMENT = '''"""Two learning rates of the tiny demo, 4 steps (tests/test_notebooks.py)."""
from sora_jax import config as config_lib
from sora_jax import sweeping

_demo = config_lib.load_module({demo!r})


def get_config(arg=None):
    return _demo.get_config("tiny,steps=4")


def get_sweep(arg=None):
    return sweeping.sweep("optimizer.lr", [1e-3, 3e-3])
'''


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, pathlib.Path]:
    """A tiny run (4 steps, samples of 2 prompts, an evaluation), and a 2-job sweep that
    trains on the run's dataset."""
    tmp = tmp_path_factory.mktemp("notebooks")
    run = tmp / "run"
    config = f"--config={DEMO}:tiny"
    steps = ("--config.total_steps=4", "--config.log_every_steps=2")
    _entry("tokenize", config, f"--workdir={run}")
    _entry("train", config, f"--workdir={run}", *steps, "--config.checkpoint_every_steps=4", CACHE)
    prompts = [f"--prompt={p}" for p in PROMPTS]
    _entry("sample", config, f"--workdir={run}", *steps, *prompts, "--steps=2", CACHE)
    evaluation = ("--config.evaluate.num_videos=2", "--config.sample.num_steps=2")
    _entry("evaluate", config, f"--workdir={run}", *steps, *evaluation, CACHE)

    experiment = tmp / "lrs.py"
    experiment.write_text(SWEEP_EXPERIMENT.format(demo=DEMO))
    sweep = tmp / "sweep"
    _entry(
        "sweep",
        f"--config={experiment}",
        f"--workdir_root={sweep}",
        "--launcher=local",
        "--",
        f"--config.data.dataset_dir={run / 'data'}",  # one dataset for the run and the sweep
        "--config.log_every_steps=2",
        "--config.checkpoint_every_steps=4",
        CACHE,
    )
    return {"SORA_RUN": run, "SORA_SWEEP": sweep, "SORA_DATA": run / "data"}


def execute(name: str, paths: dict[str, pathlib.Path]):
    """Runs notebooks/<name>.py in a fresh kernel with `paths` as SORA_* variables; any cell
    error raises nbclient's CellExecutionError with the cell and its traceback."""
    nb = jupytext.read(NOTEBOOKS / f"{name}.py")
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # as Jupyter runs it
    )
    client.execute(env={**os.environ, **ENV, **{k: str(v) for k, v in paths.items()}})
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
            out.append(o.get("data", {}).get("text/html", ""))
    return "\n".join(out)


def _images(nb) -> dict[str, list[bytes]]:
    """PNG outputs of the cells with `docs_figure` metadata, by that name."""
    found: dict[str, list[bytes]] = {}
    for cell in nb.cells:
        if "docs_figure" in cell.metadata:
            pngs = [
                o["data"]["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})
            ]
            found[cell.metadata["docs_figure"]] = [base64.b64decode(p) for p in pngs]
    return found


def check_explore_run(nb, targets):
    text = _text(nb)
    assert f"run            {targets['SORA_RUN']}" in text
    assert "checkpoints    [4]" in text and "eval steps     [4]" in text
    assert "'num_items': 2" in text  # the evaluation's protocol (evaluate.num_videos=2)
    images = _images(nb)
    assert all(len(images[k]) == 1 for k in ("loss", "loss_per_timestep", "throughput"))
    assert len(images["samples"]) == 1  # the frame strips of the sampled prompts
    assert text.count("<video") == len(PROMPTS)  # the latest step's videos, inline


def check_compare_sweep(nb, targets):
    text = _text(nb)
    assert "lr_0.001" in text and "lr_0.003" in text
    assert "jobs per state: {'done': 2}" in text
    assert re.search(r"best: lr_0\.00[13] \(final train/loss \d", text)
    assert "optimizer.lr" in text  # the config diff of best against worst
    images = _images(nb)
    assert len(images["final_loss"]) == 1 and len(images["curves"]) == 1


def check_inspect_data(nb, targets):
    text = _text(nb)
    assert "5x16x16" in text and "0 rejected inputs" in text
    images = _images(nb)
    assert len(images["buckets"]) == len(images["latents"]) == len(images["decoded"]) == 1
    assert text.count("<video") == 4  # N_PREVIEW decoded records, inline


def check_sample_playground(nb, targets):
    text = _text(nb)
    assert f"checkpoint 4 of {targets['SORA_RUN']}, weights: ema 0.99" in text
    assert len(_images(nb)["variants"]) == 1
    assert text.count("<video") == 5  # one per variant, side by side


@pytest.mark.slow
def test_every_notebook_runs_headless(targets):
    """One test for all four: under pytest-xdist a module fixture is built once per worker
    that runs one of its tests, and the tiny run and sweep are the expensive part. Every
    notebook runs even when another fails; the failure names each one that did."""
    failures = {}
    for name in NAMES:
        try:
            globals()[f"check_{name}"](execute(name, targets), targets)
        except Exception as e:  # noqa: BLE001 - collected and reported below, per notebook
            failures[name] = f"{type(e).__name__}: {e}"
    assert not failures, "\n\n".join(f"notebooks/{n}.py: {err}" for n, err in failures.items())


def render(paths: dict[str, pathlib.Path], figures: pathlib.Path) -> None:
    """Executes every notebook against `paths` and writes each `docs_figure` cell's PNG
    to `figures/<notebook>_<name>.png`."""
    figures.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        nb = execute(name, paths)
        for figure, pngs in _images(nb).items():
            for k, png in enumerate(pngs):
                suffix = f"_{k + 1}" if k else ""
                (figures / f"{name}_{figure}{suffix}.png").write_bytes(png)
                print(json.dumps({"notebook": name, "figure": f"{figure}{suffix}"}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=render.__doc__)
    parser.add_argument("--run", required=True, help="a training workdir (SORA_RUN)")
    parser.add_argument("--sweep", required=True, help="a sweep's --workdir_root (SORA_SWEEP)")
    parser.add_argument("--data", required=True, help="a tokenized dataset (SORA_DATA)")
    parser.add_argument("--figures", required=True, help="where the PNGs go")
    args = parser.parse_args()
    paths = {
        "SORA_RUN": pathlib.Path(args.run).absolute(),
        "SORA_SWEEP": pathlib.Path(args.sweep).absolute(),
        "SORA_DATA": pathlib.Path(args.data).absolute(),
    }
    render(paths, pathlib.Path(args.figures))
