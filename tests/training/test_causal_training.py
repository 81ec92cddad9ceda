"""A causal config in the one training loop's `--mode=plan`: the diffusion-forcing step of
a block-causal model compiles without data and reports its memory (the SIGKILL resume of
a causal run is tests/training/test_loop.py's, parametrized)."""

import jax

from sora_jax import config as config_lib
from sora_jax.training import plan


def test_plan_of_a_causal_config_reports_its_memory(capsys):
    config = config_lib.load_config("experiments/demo.py:tiny,causal")
    assert config.model.causal_chunk_frames == 1
    (p,) = plan.plan(config, devices=jax.devices()[:1])
    assert p.tokens == 80 and p.temp_gb > 0 and p.argument_gb > 0
    assert "temp GiB" in capsys.readouterr().out
