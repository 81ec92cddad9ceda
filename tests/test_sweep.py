"""Sweep expansion: named jobs from get_sweep, with clear errors."""

import pathlib

import pytest

from sora_jax import config as config_lib
from sora_jax import sweeping

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "experiments" / "demo.py")


def test_product_and_zip():
    a = sweeping.sweep("x", [1, 2])
    b = sweeping.sweep("y", ["p", "q"])
    assert sweeping.product(a, b) == [
        {"x": 1, "y": "p"},
        {"x": 1, "y": "q"},
        {"x": 2, "y": "p"},
        {"x": 2, "y": "q"},
    ]
    assert sweeping.zip_(a, b) == [{"x": 1, "y": "p"}, {"x": 2, "y": "q"}]
    with pytest.raises(ValueError, match="equal length"):
        sweeping.zip_(a, sweeping.sweep("y", [1]))


def test_demo_sweep_expands_to_named_jobs(tmp_path):
    jobs = sweeping.expand(f"{DEMO}:tiny", str(tmp_path))
    assert len(jobs) == 4
    assert len({j.name for j in jobs}) == 4
    assert jobs[0].name == "lr_0.001-dim_64"
    assert jobs[0].workdir == f"{tmp_path}/lr_0.001-dim_64"
    assert "--config.optimizer.lr=0.001" in jobs[0].command
    assert "--config.model.dim=64" in jobs[0].command
    assert jobs == sweeping.expand(f"{DEMO}:tiny", str(tmp_path))  # stable across runs


def test_sweep_errors(tmp_path):
    plain = tmp_path / "plain.py"
    plain.write_text(pathlib.Path(DEMO).read_text().split("def get_sweep")[0])
    with pytest.raises(config_lib.ConfigError, match="defines no get_sweep"):
        sweeping.expand(str(plain), str(tmp_path))

    def with_sweep(name, body):
        path = tmp_path / name
        path.write_text(pathlib.Path(DEMO).read_text() + f"\n\ndef get_sweep(arg=None):\n{body}")
        return str(path)

    bad = with_sweep("bad.py", "    return [{'optimizer.lrr': 1.0}]\n")
    with pytest.raises(config_lib.ConfigError, match="unknown fields"):
        sweeping.expand(bad, str(tmp_path))
    clash = with_sweep("clash.py", "    return [{'optimizer.lr': 1.0}, {'optimizer.lr': 1.0}]\n")
    with pytest.raises(config_lib.ConfigError, match="share the name"):
        sweeping.expand(clash, str(tmp_path))
