r"""The kernels behind the CPU training step, each timed alone: blockwise attention by block
size, its forward op by op, and the projections' matmuls; with `--peer_python` (an
interpreter with torch), PyTorch's attention and matmuls at the same shapes.

    python benchmarks/cpu_kernels.py
    python benchmarks/cpu_kernels.py --peer_python=/path/to/venv/bin/python

What docs/perf.md ("CPU step against PyTorch") quotes beside `benchmarks/peer_step.py`:
attention is `[B, L, N, E]` = `[2, L, 4, 64]` float32 (the peer_step model's self-attention);
"fwd+bwd" is `jax.vjp` of the kernel and its pullback, jitted together. Block sizes
alternate within one process for each length, so all see the same load; times are medians
of wall clock (both cores), with the process's CPU time beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

from sora_jax.models import blockwise_attention as bw


def _once(fn) -> tuple[float, float]:
    """(wall s, CPU s) of one `fn()` call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _timed(fn, reps: int) -> tuple[float, float]:
    """(median wall s, median CPU s) of `fn()` after one warm-up call."""
    fn()
    wall, cpu = zip(*(_once(fn) for _ in range(reps)), strict=True)
    return statistics.median(wall), statistics.median(cpu)


def _qkv(length: int, args, key: int = 0):
    keys = jax.random.split(jax.random.key(key), 4)
    shape = (args.batch, length, args.heads, args.head_dim)
    return [jax.random.normal(k, shape) for k in keys]  # q, k, v, do


def attention_blocks(args) -> None:
    shape = f"[{args.batch}, L, {args.heads}, {args.head_dim}]"
    print(f"blockwise attention fwd+bwd {shape}: wall ms (CPU ms)")
    blocks = [tuple(int(n) for n in b.split("x")) for b in args.blocks.split(",")]
    print(f"{'L':>6} " + " ".join(f"{f'{bq}x{bk}':>16}" for bq, bk in blocks))
    for length in (int(n) for n in args.lengths.split(",")):
        q, k, v, do = _qkv(length, args)
        fns = []
        for bq, bk in blocks:
            kernel = lambda q, k, v, bq=bq, bk=bk: bw.blockwise_attention(
                q, k, v, block_q=bq, block_kv=bk
            )
            pullback = lambda q, k, v, kernel=kernel, do=do: jax.vjp(kernel, q, k, v)[1](do)
            fns.append(jax.jit(pullback))
        for fn in fns:  # compile all first
            jax.block_until_ready(fn(q, k, v))
        times = [[] for _ in fns]
        for _ in range(args.reps):  # alternate the block sizes
            for i, fn in enumerate(fns):
                run = lambda fn=fn, qkv=(q, k, v): jax.block_until_ready(fn(*qkv))
                times[i].append(_once(run))  # compiled and warmed up above
        cells = []
        for t in times:
            wall, cpu = statistics.median(w for w, _ in t), statistics.median(c for _, c in t)
            cells.append(f"{wall * 1e3:.1f} ({cpu * 1e3:.1f})")
        print(f"{length:>6} " + " ".join(f"{c:>16}" for c in cells), flush=True)


def forward_ops(args) -> None:
    """The blockwise forward at `--ops_length` with the default blocks, and its ops alone at
    the block shape, times the number of query blocks."""
    length = args.ops_length
    q, k, v, _ = _qkv(length, args)
    bq, bk = bw.block_shape(length, length)
    nq = -(-length // bq)
    b, n, e = args.batch, args.heads, args.head_dim
    fwd = jax.jit(bw.blockwise_attention)
    whole, _ = _timed(lambda: jax.block_until_ready(fwd(q, k, v)), args.reps)
    qb, kb = jnp.ones((b, n, bq, e)), jnp.ones((b, n, length, e))
    s = jnp.ones((b, n, bq, length))
    ops = {
        "q k^T (batched matmul)": (
            jax.jit(lambda q, k: jnp.einsum("bnqe,bnke->bnqk", q, k)),
            (qb, kb),
        ),
        "p v (batched matmul)": (
            jax.jit(lambda p, v: jnp.einsum("bnqk,bnke->bnqe", p, v)),
            (s, kb),
        ),
        "exp(s - rowmax s)": (jax.jit(lambda s: jnp.exp(s - jnp.max(s, -1, keepdims=True))), (s,)),
        "row sums": (jax.jit(lambda s: jnp.sum(s, -1)), (s,)),
    }
    flops = 2 * b * n * bq * length * e
    what = f"blocks {bq} x {bk}, {nq} query blocks"
    print(f"\nblockwise forward at L = {length} ({what}): {whole * 1e3:.1f} ms wall")
    for name, (fn, operands) in ops.items():
        wall, _ = _timed(lambda fn=fn, o=operands: jax.block_until_ready(fn(*o)), args.reps)
        rate = f"  {flops / wall / 1e9:.0f} GFLOP/s" if "matmul" in name else ""
        print(
            f"  {name:<24} {wall * 1e3:7.2f} ms per block, x{nq}: {nq * wall * 1e3:6.1f} ms{rate}"
        )


def _rates(m: int, k: int, n: int, t_plain: float, t_grad: float) -> None:
    fl = 2 * m * k * n
    print(f"  [{m}, {k}] @ [{k}, {n}] {fl / t_plain / 1e9:5.0f}    xᵀ dy {fl / t_grad / 1e9:5.0f}")


def matmuls(args) -> list[tuple[int, int, int]]:
    """The step's projection shapes `[M, K] @ [K, N]` and the weight gradient's `xᵀ dy`."""
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.matmuls.split(",")]
    print("\nmatmuls, float32 (GFLOP/s, wall)")
    for m, kk, nn in shapes:
        x, w = jnp.ones((m, kk)), jnp.ones((kk, nn))
        dy = jnp.ones((m, nn))
        plain, grad = jax.jit(lambda x, w: x @ w), jax.jit(lambda x, dy: x.T @ dy)
        t_plain, _ = _timed(lambda f=plain, o=(x, w): jax.block_until_ready(f(*o)), args.reps)
        t_grad, _ = _timed(lambda f=grad, o=(x, dy): jax.block_until_ready(f(*o)), args.reps)
        _rates(m, kk, nn, t_plain, t_grad)
    return shapes


PEER = r"""
import json, statistics, sys, time
import torch
cfg = json.loads(sys.argv[1])
def timed(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); out.append(time.perf_counter() - t0)
    return statistics.median(out)
b, n, e, reps = cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["reps"]
res = {"torch": torch.__version__, "attention": {}, "matmuls": []}
for length in cfg["lengths"]:
    q, k, v = (torch.randn(b, n, length, e, requires_grad=True) for _ in range(3))
    do = torch.randn(b, n, length, e)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fwd = timed(lambda: sdpa(q.detach(), k.detach(), v.detach()), reps)
    both = timed(lambda: sdpa(q, k, v).backward(do), reps)
    res["attention"][length] = [fwd, both]
for m, kk, nn in cfg["matmuls"]:
    x, w, dy = torch.randn(m, kk), torch.randn(kk, nn), torch.randn(m, nn)
    res["matmuls"].append([timed(lambda: x @ w, reps), timed(lambda: x.t() @ dy, reps)])
print(json.dumps(res))
"""


def peer(args, shapes) -> None:
    lengths = [int(n) for n in args.lengths.split(",")]
    cfg = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, reps=args.reps,
               lengths=lengths, matmuls=shapes)  # fmt: skip
    out = subprocess.run(
        [args.peer_python, "-c", PEER, json.dumps(cfg)], capture_output=True, text=True
    )
    if out.returncode != 0:
        print(f"\npeer: {args.peer_python} could not run torch ({out.stderr.strip()[-300:]})")
        return
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\npeer: torch {res['torch']} scaled_dot_product_attention, wall ms")
    for length in lengths:
        fwd, both = res["attention"][str(length)]
        print(f"  L = {length:>6}: forward {fwd * 1e3:7.1f}   fwd+bwd {both * 1e3:7.1f}")
    print("peer matmuls (GFLOP/s, wall)")
    for (m, kk, nn), (t_plain, t_grad) in zip(shapes, res["matmuls"], strict=True):
        _rates(m, kk, nn, t_plain, t_grad)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="640,1280,2048,4096", help="L of the attention table")
    p.add_argument("--blocks", default="256x512,256x2048,128x2048,512x2048,512x1024",
                   help="block_q x block_kv pairs")  # fmt: skip
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--ops_length", type=int, default=1280, help="L of the forward's op split")
    p.add_argument("--matmuls", default="2560x256x1024,2560x1024x256,2560x256x256",
                   help="M x K x N: projections of peer_step's 1,280-token batch")  # fmt: skip
    p.add_argument("--reps", type=int, default=6, help="timed repetitions (medians)")
    p.add_argument("--peer_python", default="", help="an interpreter with torch ('' = none)")
    args = p.parse_args(argv)
    print(f"jax {jax.__version__}, devices {jax.devices()[0].platform}")
    attention_blocks(args)
    forward_ops(args)
    shapes = matmuls(args)
    if args.peer_python:
        peer(args, shapes)


if __name__ == "__main__":
    main()
