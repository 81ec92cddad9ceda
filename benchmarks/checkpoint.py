"""Blocking time of an asynchronous Orbax save as a fraction of the train step's time.

    python benchmarks/checkpoint.py --config=experiments/demo.py --saves=3
    python benchmarks/checkpoint.py --config=experiments/demo.py --config.model.preset=S \\
        --config.model.dim=None --config.model.num_layers=None --config.model.num_heads=None \\
        --config.model.mlp_dim=None

The trainer calls `checkpoint.save` between steps: the call returns once the arrays are
copied off the devices, the writing goes on in the background. "blocking" is that call;
"total" is until the checkpoint is committed. Record results in docs/perf.md.
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import linen as nn

from sora_jax import config as config_lib
from sora_jax.parallel import mesh as mesh_lib
from sora_jax.run import checkpoint as ckpt_lib
from sora_jax.run import setup
from sora_jax.run import train_state as state_lib
from sora_jax.training import plan
from sora_jax.training import step as step_lib

CONFIG = config_lib.define_config_flag()
SAVES = flags.DEFINE_integer("saves", 3, "Checkpoints saved (each after one step).")
STEPS = flags.DEFINE_integer("steps", 5, "Steps timed for the step time.")


def main(argv):
    del argv
    config = CONFIG.value or config_lib.load_config("experiments/demo.py")
    mesh = mesh_lib.create_mesh(config.mesh)
    rules = mesh_lib.logical_rules(config.mesh)
    geometry = plan.dataset_geometry(config)
    model, tx, init_fn, abstract, shardings = setup.setup_state(config, geometry, mesh, rules)
    state = state_lib.create_sharded_state(init_fn, mesh, rules, config.seed)
    jitted = step_lib.jit_train_step(model, tx, config, mesh, shardings)
    shape = plan.config_step_shapes(config, geometry, mesh.shape["data"] * mesh.shape["fsdp"])[0]
    compiled, _ = plan.compile_steps(jitted, abstract, geometry, [shape], config, mesh, rules)
    spec = plan.abstract_batch(geometry, shape, mesh)
    rng = np.random.default_rng(0)
    host = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in spec.items()}
    batch = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in host.items()}
    step = compiled[shape.key]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), tempfile.TemporaryDirectory() as d:
        state, m = step(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(STEPS.value):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        step_s = (time.perf_counter() - t0) / STEPS.value
        mngr = ckpt_lib.manager(d, max_to_keep=2)
        blocking, total = [], []
        for i in range(SAVES.value):
            state, m = step(state, batch)
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            ckpt_lib.save(mngr, i + 1, state, {"step": i + 1}, config.to_dict())
            blocking.append(time.perf_counter() - t0)
            mngr.wait_until_finished()
            total.append(time.perf_counter() - t0)
        mngr.close()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"state {nbytes / 2**20:.1f} MiB ({state_lib.param_count(state.params):,} parameters)")
    print(f"step time        {1e3 * step_s:9.1f} ms")
    print(f"save blocking    {1e3 * np.median(blocking):9.1f} ms (median of {len(blocking)})")
    print(f"save to commit   {1e3 * np.median(total):9.1f} ms")
    print(f"blocking / step  {np.median(blocking) / step_s:9.2f}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags, argv=sys.argv)
