"""Every script in benchmarks/ runs to the end on a tiny setting and prints its figures.

The scripts run as a user runs them, `python benchmarks/NAME.py ...`, each in its own
process on one CPU device, with the tests' persistent compilation cache. They measure
nothing here: the test only checks that each still starts, runs and reports (a benchmark
that is only run by hand breaks silently when the library changes under it).

Run as `python benchmarks/NAME.py`, benchmarks/ comes first on sys.path: a script named like
a standard-library module would replace it for every other script (a `tokenize.py` there
broke jax's import of `linecache`).
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from sora_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUMBER = r"-?[\d.]+(?:e[-+]?\d+)?"

# script -> (tiny-setting arguments, patterns its output must hold: the figures it reports).
# {run} is a trained tiny run (the `sample_run` fixture), {tmp} a fresh directory.
TINY = {
    "accelerator.py": (  # run with the GPU machines' missing packages made unimportable
        ["--smoke", "--steps=1"],
        [
            r'"record": "environment", "jax": "[\d.]+"',
            rf'"record": "attention", "impl": "blockwise", .*"fwd_tflops": {NUMBER}, '
            rf'"bwd_tflops": {NUMBER}',
            rf'"record": "train_step", "remat": "save_attention", .*"mfu": {NUMBER}',
            # save_attention keeps the kernels' residuals: self + cross, one forward each
            r'"attention_forward_kernels": {"cudnn": 0, "blockwise": 2}',
            r'"record": "done"',
        ],
    ),
    "checkpoint.py": (
        ["--config=experiments/demo.py:tiny", "--steps=1", "--saves=1"],
        [
            rf"step time\s+{NUMBER} ms",
            rf"save blocking\s+{NUMBER} ms",
            rf"blocking / step\s+{NUMBER}",
        ],
    ),
    "cpu_kernels.py": (  # no peer: jax's side only
        [
            "--lengths=64",
            "--blocks=32x32,32x64",
            "--heads=2",
            "--head_dim=8",
            "--ops_length=64",
            "--matmuls=64x16x32",
            "--reps=1",
        ],
        [
            rf"\n\s+64\s+{NUMBER} \({NUMBER}\)\s+{NUMBER} \({NUMBER}\)",
            rf"exp\(s - rowmax s\)\s+{NUMBER} ms per block",
            rf"\[64, 16\] @ \[16, 32\]\s+{NUMBER}\s+xᵀ dy\s+{NUMBER}",
        ],
    ),
    "data_pipeline.py": (
        ["--records=64", "--batch=8", "--seconds=0.2", "--settings=0/0"],
        [rf"\n\s*0\s+0\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}"],
    ),
    "flow_toy.py": (
        [
            "--steps=4",
            "--batch=4",
            "--samples=2",
            "--sample_steps=2",
            "--probe_at=",
            "--cfg_scales=1",
        ],
        [rf'"final_loss": {NUMBER}', rf'"cfg_1": {{\s*"accuracy": {NUMBER}'],
    ),
    "model_step.py": (
        ["--latent=2x4x4", "--channels=4", "--text_len=8", "--text_dim=16", "--steps=1"],
        [rf"step_ms: {NUMBER}", rf"achieved_tflops: {NUMBER}"],
    ),
    "packed_step.py": (  # one packed and one bucketed executable, dim 32 x 1 block
        [
            "--clips=200",
            "--space=8",
            "--rows=4",
            "--dim=32",
            "--layers=1",
            "--heads=2",
            "--text_len=8",
            "--reps=1",
            "--iters=1",
            "--batches=1",
            "--max_buckets=1",
            "--attention=xla",
        ],
        [
            rf"tokens stepped / s\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}",
            rf"native tokens covered / s\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}",
        ],
    ),
    "packing.py": (
        ["--clips=300", "--rows=4", "--window=128"],
        [
            rf"padding fraction\s+{NUMBER}\s+{NUMBER}",
            rf"dropped clips fraction\s+{NUMBER}\s+{NUMBER}",
        ],
    ),
    "peer_step.py": (  # sora_jax's side only: the peer (torch + diffusers) is not installed
        ["--latents=5x8x8", "--steps=1", "--warmup=1", "--peer_python=", "--split"],
        [
            rf"\n\s+80\s+{NUMBER}\s+-\s+-\s+4,944,192",
            rf"\n\s+80\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+-\s+-\s+-",  # --split's table
        ],
    ),
    "sample.py": (
        ["--workdir={run}"],
        [rf"denoise\s+{NUMBER} ms", rf"total\s+{NUMBER} ms\s+\({NUMBER} samples/s\)"],
    ),
    "synthetic_clips.py": (
        ["--clips=5", "--shapes=5x16x16"],
        [rf"5x16x16\s+5\s+{NUMBER}\s+{NUMBER}"],
    ),
    "tokenize_job.py": (
        ["--videos=2", "--size=32x32", "--frames=12", "--batch=4"],
        [rf'"clips_per_s": {NUMBER}', r'"split_s": {'],
    ),
    "tokenizer.py": (
        ["--preset=tiny", "--clip=5x16x16", "--iters=1"],
        [rf"encode\s+{NUMBER} ms/call\s+{NUMBER} frames/s", rf"decode\s+{NUMBER} ms/call"],
    ),
    "tpu_plan.py": (  # compile-only TPU devices (libtpu); the plan of the tiny demo
        ["--plans=tiny/0/v5e:2x2/fsdp", "--attention_tokens=512"],
        [
            rf"\| tiny \| 0p \| v5e:2x2 \(4 chips\) \| fsdp \| 4 \| 80 \| {NUMBER} \|",
            rf"\| 512 \| splash \| {NUMBER} \|",
            rf"\| 512 \| xla \| {NUMBER} \|",
        ],
    ),
    "train_step.py": (
        ["--config=experiments/demo.py:tiny", "--steps=1"],
        [rf"perf/step_time_s: {NUMBER}", rf"perf/samples_per_s: {NUMBER}"],
    ),
    "vae_quality.py": (
        ["--config=experiments/vae.py:tiny,steps=2", "--workdir={tmp}/vae"],
        [rf"PSNR model\s+{NUMBER} dB", rf"PSNR blurred_mean\s+{NUMBER} dB"],
    ),
}


def test_no_benchmark_shadows_the_standard_library():
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    assert len(names) >= 5
    assert not set(names) & sys.stdlib_module_names, set(names) & sys.stdlib_module_names


# Benchmarks whose tiny run needs another module's fixtures (a trained teacher and its
# distilled student): that module runs them.
RUN_ELSEWHERE = {"few_step.py": "tests/training/test_distill.py"}


def test_every_benchmark_has_a_tiny_setting():
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))
    assert sorted([*TINY, *RUN_ELSEWHERE]) == scripts
    for script, module in RUN_ELSEWHERE.items():
        text = (ROOT / module).read_text()
        assert f'"benchmarks/{script}"' in text, f"{module} does not run benchmarks/{script}"


def _env() -> dict[str, str]:
    """The tests' environment less the 8 fake devices (a user's CPU has one), with the
    persistent compilation cache of tests/conftest.py."""
    env = {**os.environ, "TQDM_DISABLE": "1", "JAX_PLATFORMS": "cpu"}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_COMPILATION_CACHE_DIR"] = str(ROOT / ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


@pytest.fixture(scope="module")
def sample_run(tiny_run, tmp_path_factory):
    """A copy of conftest's trained tiny run with the run files a training run's workdir
    holds (config.json), which `loop.train` alone does not write."""
    work, config = tiny_run
    copy = tmp_path_factory.mktemp("benchmark_run") / "run"
    shutil.copytree(work, copy)
    config_lib.write_run_files(copy, config, ["tests/conftest.py::tiny_run"])
    return copy


# Scripts that must run where these packages are missing (GPU machines lent to the project
# have jax, flax, optax, orbax, absl and numpy only): a sitecustomize makes them unimportable.
UNAVAILABLE = {"accelerator.py": ("ml_collections", "grain", "av", "array_record", "tensorboardX")}
_BLOCKER = """import sys

class _Unavailable:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not installed on this machine (test_benchmarks)")
        return None

sys.meta_path.insert(0, _Unavailable())
"""


def _env_without(blocked, tmp_path) -> dict[str, str]:
    env = _env()
    if blocked:
        (tmp_path / "sitecustomize.py").write_text(_BLOCKER.format(blocked=set(blocked)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    return env


def test_blocker_blocks(tmp_path):
    env = _env_without(UNAVAILABLE["accelerator.py"], tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", "import ml_collections"], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0 and "not installed on this machine" in proc.stderr


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_on_a_tiny_setting_and_reports(script, tmp_path, request):
    args, figures = TINY[script]
    run = request.getfixturevalue("sample_run") if any("{run}" in a for a in args) else ""
    args = [a.format(run=run, tmp=tmp_path) for a in args]
    env = _env_without(UNAVAILABLE.get(script, ()), tmp_path)
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script} {args} failed:\n{proc.stdout}\n{proc.stderr}"
    for pattern in figures:
        assert re.search(pattern, proc.stdout), f"{script}: no {pattern!r} in\n{proc.stdout}"
