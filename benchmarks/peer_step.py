r"""sora_jax's training step on CPU against the same model in PyTorch (diffusers'
`WanTransformer3DModel`, the Wan 2.1 DiT), alternating the two in one run.

    python benchmarks/peer_step.py                                  # torch + diffusers here
    python benchmarks/peer_step.py --peer_python=/path/to/venv/bin/python

Both sides build the same architecture at the same widths (4 layers, 4 heads x 64, FFN
1,024, patch 1x2x2, 16 latent channels, text 32 x 384, float32; the parameter counts are
printed and must agree) and time one forward + backward of an MSE loss on a batch of 2,
after warm-up. Each side runs in a worker process of its own (the peer needs only torch and
diffusers, which are not dependencies of sora_jax: pass `--peer_python` for an interpreter
that has them); the driver asks the two for one step in turn, so both see the same machine
load, and reports the median of each and the ratio `peer time / sora_jax time` (above 1:
sora_jax is faster). Without a peer, only sora_jax's time is reported.

`--split` also times each side with its attention replaced by an elementwise stand-in that
still consumes q, k and v (so the projections, norms and RoPE that feed attention stay in the
step): the difference is what attention costs each side inside the step (docs/perf.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WIDTHS = dict(layers=4, heads=4, head_dim=64, ffn=1024, channels=16, text_len=32, text_dim=384)
BATCH = 2


def _latent(spec: str) -> tuple[int, int, int]:
    t, h, w = (int(n) for n in spec.split("x"))
    return t, h, w


def jax_worker(latent: tuple[int, int, int], attention: str, stand_in: bool = False):
    """A `step()` of sora_jax's VideoDiT and its parameter count (`stand_in`: attention
    replaced by `_stand_in`)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from sora_jax.models import attention as attention_lib
    from sora_jax.models import build_model

    if stand_in:  # the layers look the function up on the module at each call
        attention_lib.dot_product_attention = lambda q, k, v, *a, **kw: _stand_in(
            q, k, v, seq_axis=1, mean=lambda x: jnp.mean(x, axis=1, keepdims=True)
        )

    w = WIDTHS
    cfg = dict(
        name="video_dit",
        dim=w["heads"] * w["head_dim"],
        num_layers=w["layers"],
        num_heads=w["heads"],
        mlp_dim=w["ffn"],
        freq_dim=256,
        patch_size=(1, 2, 2),
        qk_norm=True,
        cross_attn_norm=True,
        attention_impl=attention,
    )
    model = build_model(cfg, w["channels"], w["text_dim"])
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (BATCH, *latent, w["channels"]))
    t = jax.random.uniform(keys[1], (BATCH,))
    text = jax.random.normal(keys[2], (BATCH, w["text_len"], w["text_dim"]))
    mask = jnp.ones((BATCH, w["text_len"]), bool)
    target = jax.random.normal(keys[3], x.shape)
    params = nn.meta.unbox(jax.jit(model.init)(keys[4], x, t, text, mask)["params"])

    @jax.jit
    def grad(p):
        return jax.value_and_grad(
            lambda p: jnp.mean((model.apply({"params": p}, x, t, text, mask) - target) ** 2)
        )(p)

    def step():
        jax.block_until_ready(grad(params))

    return step, sum(a.size for a in jax.tree.leaves(params))


def torch_worker(latent: tuple[int, int, int], stand_in: bool = False):
    """A `step()` of diffusers' WanTransformer3DModel and its parameter count (`stand_in`:
    attention replaced by `_stand_in`)."""
    import torch
    from diffusers import WanTransformer3DModel

    if stand_in:  # diffusers' native backend calls it through the module: [B, N, L, E]
        torch.nn.functional.scaled_dot_product_attention = lambda query, key, value, *a, **kw: (
            _stand_in(query, key, value, seq_axis=2, mean=lambda x: x.mean(2, keepdim=True))
        )

    w = WIDTHS
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=w["heads"],
        attention_head_dim=w["head_dim"],
        in_channels=w["channels"],
        out_channels=w["channels"],
        text_dim=w["text_dim"],
        freq_dim=256,
        ffn_dim=w["ffn"],
        num_layers=w["layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    ).float()
    x = torch.randn(BATCH, w["channels"], *latent)
    t = torch.rand(BATCH) * 1000
    text = torch.randn(BATCH, w["text_len"], w["text_dim"])
    target = torch.randn_like(x)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x, t, text, return_dict=False)[0]
        torch.nn.functional.mse_loss(out, target).backward()

    return step, sum(p.numel() for p in model.parameters())


def _stand_in(q, k, v, seq_axis: int, mean):
    """What `--split` puts where attention was: self-attention returns `v + 1e-6 (q + k)`,
    cross-attention `q + 1e-6 mean(k + v)` over the keys; elementwise, so the step keeps
    computing q, k and v (they are not dead code) but none of attention's own work."""
    if v.shape[seq_axis] == q.shape[seq_axis]:
        return v + 1e-6 * (q + k)
    return q + 1e-6 * mean(k + v)


def serve(kind: str, latent: tuple[int, int, int], attention: str, warmup: int) -> None:
    """Worker: builds its side, warms up, then times one step per line read on stdin."""
    side, stand_in = kind.removesuffix("-stand_in"), kind.endswith("-stand_in")
    if side == "jax":
        step, count = jax_worker(latent, attention, stand_in)
    else:
        step, count = torch_worker(latent, stand_in)
    for _ in range(warmup):
        step()
    print(json.dumps({"ready": True, "params": count}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        step()
        print(json.dumps({"s": time.perf_counter() - t0}), flush=True)


class Worker:
    def __init__(self, python: str, kind: str, args):
        cmd = [python, os.path.abspath(__file__), f"--_worker={kind}", f"--latents={args.latent}"]
        cmd += [f"--attention={args.attention}", f"--warmup={args.warmup}"]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}  # a CPU comparison
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args} exited ({self.proc.wait()})")
        return json.loads(line)

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()["s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _has_peer(python: str) -> bool:
    probe = "import torch, diffusers"
    return subprocess.run([python, "-c", probe], capture_output=True).returncode == 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latents", default="5x16x16,5x32x32", help="T x H x W: 320, 1280 tokens")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--attention", default="auto", help="sora_jax's model.attention_impl")
    p.add_argument("--peer_python", default=sys.executable, help="'' = no peer")
    p.add_argument("--split", action="store_true", help="also time each side without attention")
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        serve(args._worker, _latent(args.latents), args.attention, args.warmup)
        return
    peer = args.peer_python and _has_peer(args.peer_python)
    if not peer:
        print("peer: torch + diffusers not found (pass --peer_python); timing sora_jax only")
    sides = ["jax", "torch"] if peer else ["jax"]
    kinds = sides + [f"{side}-stand_in" for side in sides] if args.split else sides
    print(f"{'tokens':>7} {'sora_jax s':>11} {'peer s':>9} {'peer / sora_jax':>16}  params")
    split_rows = []
    for spec in args.latents.split(","):
        args.latent = spec
        t, h, w = _latent(spec)
        tokens = t * (h // 2) * (w // 2)
        python = {"jax": sys.executable, "torch": args.peer_python}
        workers = {k: Worker(python[k.split("-")[0]], k, args) for k in kinds}
        times = {k: [] for k in kinds}
        for _ in range(args.steps):  # alternate: every worker sees the same load
            for k, worker in workers.items():
                times[k].append(worker.step())
        for worker in workers.values():
            worker.close()
        med = {k: statistics.median(v) for k, v in times.items()}
        row = f"{tokens:>7} {med['jax']:>11.3f}"
        params = f"{workers['jax'].info['params']:,}"
        if peer:
            row += f" {med['torch']:>9.3f} {med['torch'] / med['jax']:>15.2f}x"
            params += f" vs {workers['torch'].info['params']:,}"
        else:
            row += f" {'-':>9} {'-':>16}"
        print(f"{row}  {params}", flush=True)
        if args.split:
            cells = []
            for side in ("jax", "torch"):
                if side in sides:
                    rest = med[f"{side}-stand_in"]
                    cells += [f"{med[side]:.3f}", f"{rest:.3f}", f"{med[side] - rest:.3f}"]
                else:
                    cells += ["-"] * 3
            split_rows.append(f"{tokens:>7} " + " ".join(f"{c:>10}" for c in cells))
    if args.split:
        print("\nseconds per step; 'rest' = attention replaced by the elementwise stand-in")
        head = ["sora_jax", "rest", "attention", "peer", "rest", "attention"]
        print(f"{'tokens':>7} " + " ".join(f"{c:>10}" for c in head))
        print("\n".join(split_rows))


if __name__ == "__main__":
    main()
