r"""Does diffusers load sora_jax's two-expert export and reproduce sora_jax's outputs?

Three steps, the middle one in an environment with torch and diffusers (the others in
sora_jax's own; neither is a dependency of the other):

    .venv/bin/python scripts/check_wan22_export.py export --dir=/tmp/wan22_export
    /work/peer/bin/python scripts/check_wan22_export.py diffusers --dir=/tmp/wan22_export
    .venv/bin/python scripts/check_wan22_export.py compare --dir=/tmp/wan22_export

`export`: a tiny two-expert sora_jax model (two VideoDiTs in golden/wan22/high's shape, random
weights with every leaf perturbed, so no norm or bias is at its initial value) written with
`wan_export.export_two_experts` (boundary 0.875), and its parameters kept in DIR/params.npz.
`diffusers`: `WanPipeline.from_pretrained(DIR)` (the exported folder; scheduler
`FlowMatchEulerDiscreteScheduler(shift=5)` passed in, vae, text encoder and tokenizer None)
runs 8 steps on fixed latents and text embeddings; a hook on each transformer records every
step's timestep, input and output (DIR/diffusers_steps.npz). `compare`: sora_jax's sampling
model function (`wan_experts.sampling_apply_fn`) on each recorded input: the expert it picks
and its output against the pipeline's. Writes tests/models/golden/wan22/export_report.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "models" / "golden" / "wan22"
RATIO = 0.875
STEPS = 8


def _model():
    import jax

    from sora_jax.models import dit, wan_experts
    from sora_jax.models import wan_import as wan

    fields, shapes = wan.fields_from_diffusers(wan.read_diffusers_config(GOLDEN / "high"))
    expert = dit.VideoDiT(
        in_channels=shapes.in_channels,
        out_channels=shapes.out_channels,
        text_dim=shapes.text_dim,
        **fields,
    )
    return wan_experts.two_experts(expert, RATIO), fields, shapes, jax


def export(directory: pathlib.Path) -> None:
    import jax.numpy as jnp
    from flax import traverse_util

    from sora_jax.models import wan_export

    model, fields, shapes, jax = _model()
    x = jnp.zeros((1, 1, 2, 2, shapes.in_channels))
    text, mask = jnp.zeros((1, 3, shapes.text_dim)), jnp.ones((1, 3), bool)
    boxed = model.init(jax.random.key(7), x, jnp.zeros((1,)), text, mask)["params"]
    params = jax.tree.map(
        lambda a: a.value if hasattr(a, "value") else a,
        boxed,
        is_leaf=lambda a: hasattr(a, "value"),
    )
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(8), len(leaves))
    # Zero-initialized leaves (head, modulation, biases) must carry weight for the check.
    params = jax.tree.unflatten(
        tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    )
    wan_export.export_two_experts(params, fields, directory, boundary_ratio=RATIO)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    np.savez(directory / "params.npz", **{k: np.asarray(v) for k, v in flat.items()})
    print(f"exported {directory} (transformer/, transformer_2/, model_index.json)")


def run_diffusers(directory: pathlib.Path) -> None:
    import diffusers
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    # The export writes the transformers only; the other components are passed in (here
    # None: the steps take text embeddings and return latents).
    pipe = WanPipeline.from_pretrained(
        str(directory),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
    )
    steps = []

    def hook(expert):
        def record(module, args, kwargs, out):
            steps.append(
                dict(
                    expert=expert,
                    timestep=kwargs["timestep"].float().numpy().copy(),
                    latents=kwargs["hidden_states"].numpy().copy(),
                    output=out[0].numpy().copy(),
                )
            )

        return record

    pipe.transformer.register_forward_hook(hook(0), with_kwargs=True)
    pipe.transformer_2.register_forward_hook(hook(1), with_kwargs=True)
    cfg = pipe.transformer.config
    gen = torch.Generator().manual_seed(4)
    text = torch.randn(1, 7, cfg.text_dim, generator=gen)
    latents = torch.randn(1, cfg.in_channels, 2, 4, 6, generator=gen)
    with torch.no_grad():
        pipe(
            prompt_embeds=text,
            negative_prompt_embeds=text,
            guidance_scale=1.0,
            height=32,
            width=48,
            num_frames=5,
            num_inference_steps=STEPS,
            latents=latents,
            output_type="latent",
        )
    np.savez(
        directory / "diffusers_steps.npz",
        boundary_ratio=np.float64(pipe.config.boundary_ratio),
        text=text.numpy(),
        expert=np.array([s["expert"] for s in steps]),
        timestep=np.stack([s["timestep"] for s in steps]),
        latents=np.stack([s["latents"] for s in steps]),
        output=np.stack([s["output"] for s in steps]),
        torch=np.array(torch.__version__),
        diffusers=np.array(diffusers.__version__),
    )
    print("steps: " + ", ".join(f"t={s['timestep'][0]:.1f}->{s['expert']}" for s in steps))


def compare(directory: pathlib.Path) -> dict:
    import jax.numpy as jnp
    from flax import traverse_util

    from sora_jax.models import wan_experts

    model, _, _, jax = _model()
    params = traverse_util.unflatten_dict(dict(np.load(directory / "params.npz")), sep="/")
    io = dict(np.load(directory / "diffusers_steps.npz"))
    apply = jax.jit(wan_experts.sampling_apply_fn(model))
    text = jnp.asarray(io["text"])
    mask = jnp.ones(text.shape[:2], bool)
    errs, rel, picked = [], [], []
    for i in range(len(io["expert"])):
        x = jnp.asarray(io["latents"][i]).transpose(0, 2, 3, 4, 1)  # [B, C, T, H, W] -> BTHWC
        t = jnp.asarray(io["timestep"][i], jnp.float32) / wan_experts.NUM_TRAIN_TIMESTEPS
        v = np.asarray(apply(params, x, t, text, mask)).transpose(0, 4, 1, 2, 3)
        want = io["output"][i]
        errs.append(float(np.abs(v - want).max()))
        rel.append(errs[-1] / float(np.abs(want).max()))
        picked.append(int(wan_experts.expert_index(t[0], RATIO)))
    report = {
        "what": "sora_jax two-expert export loaded by diffusers' WanPipeline.from_pretrained; "
        "each pipeline step's transformer output vs sora_jax's sampling_apply_fn",
        "torch": str(io["torch"]),
        "diffusers": str(io["diffusers"]),
        "boundary_ratio_loaded": float(io["boundary_ratio"]),
        "steps": len(errs),
        "pipeline_expert": io["expert"].tolist(),
        "sora_jax_expert": picked,
        "max_abs_diff": max(errs),
        "max_rel_diff": max(rel),
        "max_abs_output": float(np.abs(io["output"]).max()),
    }
    (GOLDEN / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = picked == io["expert"].tolist() and report["boundary_ratio_loaded"] == RATIO
    ok = ok and max(rel) <= 1e-5 and set(picked) == {0, 1}
    if not ok:
        raise SystemExit("export check FAILED: see the report above")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["export", "diffusers", "compare"])
    parser.add_argument("--dir", required=True, type=pathlib.Path)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.step != "diffusers":
        sys.path.insert(0, str(ROOT))
    {"export": export, "diffusers": run_diffusers, "compare": compare}[args.step](args.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
