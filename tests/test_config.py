"""Config loading, variant arguments, locked overrides and validation."""

import json
import pathlib
import subprocess
import sys
import time

import pytest

from sora_jax import config as config_lib
from sora_jax.run import validate as validate_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "experiments" / "demo.py")


def test_parse_arg_types_and_flags():
    arg = config_lib.parse_arg(
        "tiny,steps=12,lr=3e-4,name=b", tiny=False, steps=0, lr=1.0, name="a"
    )
    assert arg.tiny is True and arg.steps == 12 and arg.lr == pytest.approx(3e-4)
    assert arg.name == "b"
    assert config_lib.parse_arg(None, tiny=False).tiny is False


@pytest.mark.parametrize(
    "arg, message",
    [("tiyn", "did you mean 'tiny'"), ("steps=abc", "not a int"), ("steps", "needs a value")],
)
def test_parse_arg_errors(arg, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.parse_arg(arg, tiny=False, steps=0)


def test_demo_config_is_locked_and_complete():
    config = config_lib.load_config(f"{DEMO}:tiny")
    for field in config_lib.REQUIRED_FIELDS:
        assert field in config
    with pytest.raises(AttributeError):
        config.optimizer.lrr = 1.0
    validate_lib.validate(config)


def test_override_typo_names_nearest_key():
    argv = ["train", f"--config={DEMO}:tiny", "--config.optimizer.lrr=3e-4"]
    with pytest.raises(config_lib.ConfigError, match="did you mean 'optimizer.lr'"):
        config_lib.check_overrides(argv)
    config_lib.check_overrides(["train", f"--config={DEMO}:tiny", "--config.optimizer.lr=1"])


def test_validation_names_field_and_bucket():
    config = config_lib.load_config(f"{DEMO}:tiny")
    config.data.buckets["5x16x16"].height = 18  # 18 / 2 = 9 latent rows, not divisible by 2
    config.model.num_heads = 3  # 64 is not divisible by 3
    with pytest.raises(config_lib.ConfigError) as e:
        validate_lib.validate(config)
    text = str(e.value)
    assert "data.buckets.5x16x16" in text and "patch_size" in text
    assert "model.num_heads=3" in text


def test_validation_checks_batch_against_mesh(devices):
    config = config_lib.load_config(f"{DEMO}:tiny")
    config.data.global_batch_size = 12  # 8 data-parallel devices
    with pytest.raises(config_lib.ConfigError, match="global_batch_size=12"):
        validate_lib.validate(config)


def test_run_files_round_trip(tmp_path):
    config = config_lib.load_config(f"{DEMO}:tiny")
    config_lib.write_run_files(tmp_path, config, ["sora-train", "--config=x"])
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["packages"]["jax"] and env["devices"]
    assert "--config=x" in (tmp_path / "command.txt").read_text()
    back = config_lib.load_run_config(tmp_path)
    assert back.model.patch_size == tuple(config.model.patch_size)
    assert config_lib.to_dict(back) == config_lib.to_dict(config)


def test_cli_typo_fails_fast_with_suggestion(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sora_jax.train",
            "--config=experiments/demo.py:tiny",
            f"--workdir={tmp_path}",
            "--config.optimizer.lrr=3e-4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert "did you mean 'optimizer.lr'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "config.json").exists()
    print(f"typo rejected in {elapsed:.1f}s")
