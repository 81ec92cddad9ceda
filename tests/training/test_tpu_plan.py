"""Compiling for a real TPU slice on this CPU-only host (libtpu's compile-only devices).

What these tests exist for: a plan made on a CPU host for a TPU topology must compile the
TPU program the run will execute, i.e. the Mosaic splash kernel, not the XLA attention nor
the Pallas interpreter that the host's own backend would pick. The executable's text names
each Mosaic kernel (`tpu_custom_call`), which is what the assertions read.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from sora_jax.models import attention, splash
from sora_jax.parallel import compiler_flags
from sora_jax.parallel import topology as topology_lib
from sora_jax.training import plan

from .test_plan import tiny

pytest.importorskip("libtpu", reason="TPU plans need libtpu: pip install -e '.[tpu]'")

SPLASH_FWD = "splash_mha_fwd"
SPLASH_BWD = "splash_mha_dkv"  # the fused backward (dK, dV and dQ in one kernel)


def tpu_config(**mesh):
    config = tiny({"attention_impl": "auto", "dtype": "bfloat16"}, **mesh)
    config.mesh.ici_data, config.mesh.ici_fsdp = 1, mesh.get("fsdp", -1)
    return config


def kernel_names(p) -> str:
    return " ".join(f"{k}x{n}" for k, n in p.kernels.items())


def test_topology_names_map_to_slices():
    cases = {
        "v5p-8": ("v5p", (2, 2, 1), 4),
        "v5p-128": ("v5p", (4, 4, 4), 64),
        "v4-32": ("v4", (2, 2, 4), 16),
        "v5e-16": ("v5e", (4, 4), 16),
        "v5litepod-8": ("v5e", (2, 4), 8),
        "v6e-64": ("v6e", (8, 8), 64),
        "v6e:4x8": ("v6e", (4, 8), 32),
        "V5P:2x2x2": ("v5p", (2, 2, 2), 8),
    }
    for name, (gen, shape, chips) in cases.items():
        t = topology_lib.parse(name)
        assert (t.generation, t.shape, t.chips) == (gen, shape, chips), name
    assert topology_lib.parse("v5e:2x2", num_slices=2).chips == 8
    for bad, match in [
        ("v5p-6", "TensorCores"),
        ("v5e-12", "power-of-two"),
        ("v5e:2x2x2", "2D"),
        ("h100-8", "not a TPU topology"),
    ]:
        with pytest.raises(topology_lib.TopologyError, match=match):
            topology_lib.parse(bad)


def test_splash_tiles_are_whole_blocks_of_the_configured_size():
    assert splash.tile(7_800, 1024) == (1024, 8_192)  # 8 blocks, not 61 of 128
    assert splash.tile(32_760, 512) == (512, 32_768)
    assert splash.tile(80, 512) == (128, 128)  # short sequences: one lane-rounded block
    with pytest.raises(ValueError, match="model.splash_block_size=100"):
        splash.tile(1_000, 100)


def test_production_flags_are_accepted_by_libtpu():
    """An unknown flag in LIBTPU_INIT_ARGS aborts libtpu: describe a slice with exactly
    the flags a run exports, in a fresh process."""
    code = "from sora_jax.parallel import topology as t; print(len(t.devices(t.parse('v5e:2x2'))))"
    env = {**os.environ, **compiler_flags.env("tpu"), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "4", out.stderr[-2000:]


def count(p, prefix: str) -> int:
    return sum(n for k, n in p.kernels.items() if k.startswith(prefix))


@pytest.mark.parametrize("topology, remat", [("v5e:2x2", "full"), ("v5p-8", "save_attention")])
def test_a_cpu_host_plans_the_tpu_program_with_mosaic_splash(topology, remat, capsys):
    """attention_impl='auto' on a CPU host, planned for a TPU: splash compiled by Mosaic
    (forward and backward kernels per attention), neither XLA attention nor the
    interpreter (both would leave no tpu_custom_call). With remat='full' the backward
    reruns each attention forward; 'save_attention' keeps the kernel's named residuals,
    so there is one forward per attention (one dK/dV kernel each)."""
    config = tpu_config()
    config.model.remat = remat
    (p,) = plan.plan(config, topology=topology)
    names = kernel_names(p)
    assert SPLASH_FWD in names and SPLASH_BWD in names, names
    forwards_per_attention = count(p, SPLASH_FWD) / count(p, SPLASH_BWD)
    assert forwards_per_attention == (2 if remat == "full" else 1), names
    out = capsys.readouterr().out
    assert f"plan for {topology}" in out and "TPU v" in out and "Mosaic kernels" in out
    assert "memory per device 16 GiB" in out or "memory per device 95 GiB" in out
    if topology == "v5e:2x2":  # the same config planned for this host's CPUs: none
        (host,) = plan.plan(tpu_config(fsdp=8), devices=jax.devices())
        assert host.kernels == {}


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_context_parallel_plans_compile_for_tpu(strategy):
    """Context 2 x fsdp 2 on a v5p-8. Ulysses runs splash on its gathered heads; the ring
    merges blockwise blocks (splash returns no softmax statistics to merge) while the
    cross-attention, split by queries, stays on splash."""
    config = tpu_config(context=2, fsdp=2)
    config.model.context_parallel = strategy
    (p,) = plan.plan(config, topology="v5p-8")
    names = kernel_names(p)
    assert SPLASH_FWD in names and SPLASH_BWD in names, names


def test_two_slices_put_the_data_axis_over_dcn(capsys):
    """Also: host-memory offload is judged by the target (TPUs have pinned host memory;
    this CPU host has none, and would refuse 'offload_attention' for itself)."""
    config = tpu_config(fsdp=4)
    config.mesh.dcn_data = 2
    config.model.remat = "offload_attention"
    (p,) = plan.plan(config, topology="v5e:2x2", num_slices=2)
    assert SPLASH_FWD in kernel_names(p)
    out = capsys.readouterr().out
    assert "2 slices, 8 chips" in out and "'data': 2, 'fsdp': 4" in out


def test_splash_leaves_out_the_scores_the_xla_kernel_materializes():
    """One self-attention forward + backward (Wan-1.3B heads) on one v5p chip: the XLA
    kernel's temporaries hold [N, L, L] float32 scores (3 GiB at 8,192 tokens); splash's
    are a fraction of that and grow linearly with L (inputs, gradients, transposes)."""
    device = topology_lib.devices(topology_lib.parse("v5p:2x2x1"))[0]
    mesh = jax.sharding.Mesh([device], ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def temp_bytes(impl, tokens):
        x = jax.ShapeDtypeStruct((1, tokens, 12, 128), jnp.bfloat16, sharding=replicated)

        def loss(q, k, v):
            return jnp.sum(attention.dot_product_attention(q, k, v, impl=impl).astype(float))

        with jax.set_mesh(mesh):
            exe = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
        return exe.memory_analysis().temp_size_in_bytes

    scores = 12 * 8_192**2 * 4
    assert temp_bytes("xla", 8_192) > scores
    splash_8k = temp_bytes("splash", 8_192)
    assert splash_8k < 0.15 * scores
    assert temp_bytes("splash", 16_384) < 2.5 * splash_8k  # linear in L, not quadratic


def test_a_step_the_tpu_compiler_refuses_fails_the_plan_naming_the_bucket():
    """Over the chip's HBM the TPU compiler itself refuses the step (a CPU compile would
    not): the plan says which bucket, on what, and what to change."""
    config = tpu_config()
    config.data.global_batch_size = 262_144
    with pytest.raises(plan.PlanError, match=r"bucket 5x16x16 .* TPU v5 lite: .*memory.*"):
        plan.plan(config, topology="v5e:2x2")
