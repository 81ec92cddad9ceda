r"""Plans of the Wan-sized presets compiled for real TPU slices, and splash vs XLA attention
memory on one chip, from any host (libtpu, the `tpu` extra; no TPU needed).

    python benchmarks/tpu_plan.py                      # the docs/perf.md tables
    python benchmarks/tpu_plan.py --plans=1_3b/480/v5p-8/fsdp --attention_tokens=

Each plan is `--mode=plan --topology=...` of `experiments/wan.py` (sora_jax/training/
plan.py), compiled in its own process: per-chip arguments, temporaries and peak from the
TPU executable's memory_analysis, the global batch, the compile time, and whether it fits
the chip. A compile that fails (e.g. a kernel over a memory space) is reported with the
compiler's message. `--attention_tokens` compiles one self-attention forward + backward
(Wan-1.3B heads, 12 x 128, bfloat16) on one chip per kernel and reports its temporaries.

Entries: SIZE/HEIGHT/TOPOLOGY/STRATEGY[/BATCH], HEIGHT 480 (832x480) or 720 (1280x720),
81 frames; STRATEGY `fsdp` (every chip on fsdp), `ulyssesN` (context N with Ulysses,
fsdp on the rest) or `zeroN` (the same, with parameters, optimizer state and EMA sharded
over fsdp x context, i.e. over every chip), each optionally `-noema` (no EMA copy of the
parameters); BATCH defaults to one sample per chip.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; the TPU is described
ROOT = pathlib.Path(__file__).resolve().parent.parent

DEFAULT_PLANS = ",".join(
    f"{size}/{h}/{topo}/fsdp"
    for size in ("1_3b", "14b")
    for h in (480, 720)
    for topo in ("v5p-8", "v5p-64", "v6e-8", "v6e-64")
)
SIZES = {480: (480, 832), 720: (720, 1280)}


def _config(entry: str, chips: int):
    from sora_jax import config as config_lib
    from sora_jax.parallel import mesh as mesh_lib

    size, height, _, strategy, *batch = entry.split("/")
    if size in ("demo", "tiny"):  # the test suite's tiny setting
        c = config_lib.load_config(str(ROOT / "experiments" / "demo.py") + ":tiny")
        c.model.attention_impl, c.model.dtype = "auto", "bfloat16"
    else:
        h, w = SIZES[int(height)]
        c = config_lib.load_config(
            f"{ROOT / 'experiments' / 'wan.py'}:size={size},height={h},width={w}"
        )
    c.mesh.ici_data, c.mesh.ici_fsdp, c.mesh.ici_context = 1, -1, 1
    if strategy.endswith("-noema"):  # no EMA copy of the parameters
        strategy = strategy.removesuffix("-noema")
        c.optimizer.ema_decays, c.sample.ema_decay = (), 0.0
    if strategy.startswith(("ulysses", "zero")):
        c.mesh.ici_context = int(strategy.removeprefix("ulysses").removeprefix("zero"))
        c.model.context_parallel = "ulysses"
    elif strategy != "fsdp":
        raise SystemExit(f"{entry}: strategy {strategy!r} is not fsdp, ulyssesN or zeroN")
    if strategy.startswith("zero"):  # parameters and optimizer state over fsdp x context
        rules = dict(mesh_lib.DEFAULT_RULES)
        rules.update(embed=("fsdp", "context"), conv_out=("fsdp", "context"))
        c.mesh.logical_axis_rules = tuple(rules.items())
    c.data.global_batch_size = int(batch[0]) if batch else chips // c.mesh.ici_context
    return c


def plan_one(entry: str) -> dict:
    """Plans one entry in this process and returns its row."""
    from sora_jax.parallel import topology as topology_lib
    from sora_jax.training import plan as plan_lib

    size, height, topo, strategy, *_ = entry.split("/")
    slice_ = topology_lib.parse(topo)
    config = _config(entry, slice_.chips)
    row = dict(entry=entry, size=size, height=height, topology=topo, strategy=strategy)
    row.update(chips=slice_.chips, batch=int(config.data.global_batch_size))
    t0 = time.perf_counter()
    try:
        (p,) = plan_lib.plan(config, topology=topo, memory_gb=1e9)  # fit judged below
    except Exception as e:  # a compiler refusal is a result here
        msg = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        row.update(error=msg[:300], compile_s=round(time.perf_counter() - t0, 1))
        return row
    limit = plan_lib.device_memory_gb(topology_lib.devices(slice_)[0])
    row.update(
        tokens=p.tokens,
        args_gib=round(p.argument_gb, 2),
        temp_gib=round(p.temp_gb, 2),
        peak_gib=round(p.peak_gb, 2),
        chip_gib=limit,
        fits=bool(limit is None or p.peak_gb <= limit),
        compile_s=round(p.compile_s, 1),
        kernels=p.kernels,
    )
    return row


def attention_one(tokens: int, impl: str, topo: str) -> dict:
    """Temporaries of one self-attention forward + backward on one chip of `topo`."""
    import jax
    import jax.numpy as jnp

    from sora_jax.models import attention
    from sora_jax.parallel import topology as topology_lib

    device = topology_lib.devices(topology_lib.parse(topo))[0]
    mesh = jax.sharding.Mesh([device], ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((1, tokens, 12, 128), jnp.bfloat16, sharding=sharding)

    def loss(q, k, v):
        return jnp.sum(attention.dot_product_attention(q, k, v, impl=impl).astype(jnp.float32))

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        exe = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    mem = exe.memory_analysis()
    return dict(
        tokens=tokens,
        impl=impl,
        topology=topo,
        temp_gib=round(mem.temp_size_in_bytes / 1024**3, 3),
        scores_gib=round(12 * tokens * tokens * 4 / 1024**3, 3),  # one [N, L, L] f32 copy
        compile_s=round(time.perf_counter() - t0, 1),
    )


def _child(kind: str, arg: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, f"--_{kind}={arg}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(entry=arg, error=f"compile did not finish in {timeout:g} s")
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    lines = out.stderr.strip().splitlines() or ["no output"]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
    return dict(entry=arg, error=(errors or lines)[-1][:300])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plans", default=DEFAULT_PLANS, help="comma-separated entries ('' = none)")
    p.add_argument("--attention_tokens", default="8192,32768")
    p.add_argument("--attention_topology", default="v5p:2x2x1")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per compile")
    p.add_argument("--out", default="", help="also append the JSON lines to this file")
    p.add_argument("--_plan", default="", help=argparse.SUPPRESS)
    p.add_argument("--_attention", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._plan:
        print(json.dumps(plan_one(args._plan)), flush=True)
        return
    if args._attention:
        tokens, impl, topo = args._attention.split("/", 2)
        print(json.dumps(attention_one(int(tokens), impl, topo)), flush=True)
        return

    rows = []
    for entry in filter(None, args.plans.split(",")):
        row = _child("plan", entry, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for tokens in filter(None, args.attention_tokens.split(",")):
        for impl in ("splash", "xla"):
            row = _child("attention", f"{tokens}/{impl}/{args.attention_topology}", args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The rows as the markdown tables of docs/perf.md."""
    plans = [r for r in rows if "strategy" in r or ("entry" in r and "impl" not in r)]
    attn = [r for r in rows if "impl" in r]
    out = []
    if plans:
        out += [
            "| model | video | slice | strategy | batch | tokens | args GiB | temp GiB | "
            "peak GiB / chip | fits | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in plans:
            if "error" in r and "size" not in r:
                out.append(f"| {r['entry']} | | | | | | | | | error: {r['error']} | |")
                continue
            if "error" in r:  # the compiler refused the step: its words
                msg = r["error"].split("; shrink")[0].split(": ", 1)[-1]
                out.append(
                    f"| {r['size']} | {r['height']}p | {r['topology']} ({r['chips']} chips) | "
                    f"{r['strategy']} | {r['batch']} | | | | | no: {msg} | {r['compile_s']} |"
                )
                continue
            fits = "yes" if r["fits"] else f"no ({r['chip_gib']:g} GiB)"
            out.append(
                f"| {r['size']} | {r['height']}p | {r['topology']} ({r['chips']} chips) | "
                f"{r['strategy']} | {r['batch']} | {r['tokens']} | {r['args_gib']} | "
                f"{r['temp_gib']} | {r['peak_gib']} | {fits} | {r['compile_s']} |"
            )
    if attn:
        out += [
            "",
            "| tokens | kernel | temporaries GiB | one [N, L, L] f32 scores GiB | compile s |",
            "|---|---|---|---|---|",
        ]
        for r in attn:
            if "error" in r:
                out.append(f"| {r.get('entry')} | | error: {r['error']} | | |")
                continue
            out.append(
                f"| {r['tokens']} | {r['impl']} | {r['temp_gib']} | {r['scores_gib']} | "
                f"{r['compile_s']} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    main()
