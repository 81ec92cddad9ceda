"""Makes tests/models/golden/wan_dit/: Wan 2.1 transformer goldens from diffusers (PyTorch).

Run with an environment that has torch, diffusers and safetensors (no jax needed; sora_jax
itself does not depend on them):

    /work/venv-ref/bin/python scripts/make_wan_goldens.py

It writes, all small (the directory stays well under 1 MB):

- `tiny/`: a tiny randomly initialized `diffusers.WanTransformer3DModel` (the class and
  tensor layout of the published Wan 2.1 T2V checkpoints; 2 layers, 2 heads of 16, FFN 64,
  text dim 32, freq dim 32, patch (1, 2, 2), 4 channels) saved with `save_pretrained`,
  sharded on purpose (`diffusion_pytorch_model.safetensors.index.json` + shards) so the
  converter's shard handling is tested too. Norm weights and biases are perturbed away
  from their ones/zeros init so a dropped or swapped affine norm shows in the outputs.
- `tiny_io.npz`: fixed inputs and PyTorch float32 outputs:
  `latents [B, C, T, H, W]`, `timestep [B]` (diffusers' scale, 0..1000), `text [B, S, D_text]`,
  `blocks_out [B, L, D]` (hidden states after the last block), `output [B, C, T, H, W]`,
  and `timestep_frames [B, T]` / `output_frames` for per-frame timesteps (diffusers
  takes them per token, `[B, L]`, each token carrying its frame's time).
- `probes.npz`: single-layer references (LayerNorm, RMSNorm, tanh-GELU, timestep
  sinusoid, RoPE tables) on inputs where eps, approximation and frequency split show.
- `wan2_1_1_3b_shapes.json`: every tensor name and shape of the published Wan2.1-T2V-1.3B
  diffusers transformer, from the class instantiated on the `meta` device (no weights).

`--check_export=DIR` instead loads a sora_jax export (`python -m sora_jax.wan export ...`
of the converted tiny checkpoint) with `WanTransformer3DModel.from_pretrained`
and checks it reproduces `tiny_io.npz`: the round trip through diffusers itself.
`from_pretrained` needs `accelerate` for this class (it keeps some modules in float32).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import diffusers
import numpy as np
import torch
from diffusers import WanTransformer3DModel

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/models/golden/wan_dit"
SEED = 0

TINY_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)

# Wan2.1-T2V-1.3B-Diffusers/transformer/config.json (the published model).
WAN_1_3B_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)

# Inputs: B=2, C=4, T=3 latent frames of 4x6 -> 3x2x3 = 18 tokens; S=7 text tokens.
# Timesteps are multiples of 1000/8 so that t = timestep / 1000 is exact in float32.
BATCH, FRAMES, HEIGHT, WIDTH, TEXT_LEN = 2, 3, 4, 6, 7
TIMESTEP = [250.0, 875.0]
TIMESTEP_FRAMES = [[125.0, 500.0, 1000.0], [0.0, 375.0, 625.0]]


def _perturb_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Moves every norm weight/bias off its ones/zeros init (a random model that a missing
    or swapped affine norm would not reproduce)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name or name.startswith("norm"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _run(model, latents, timestep, text):
    """`(blocks_out, output)` of the model, with the hidden states after the last block."""
    captured = {}
    hook = model.blocks[-1].register_forward_hook(
        lambda mod, args, out: captured.__setitem__("blocks_out", out)
    )
    try:
        with torch.no_grad():
            out = model(latents, timestep, text, return_dict=False)[0]
    finally:
        hook.remove()
    return captured["blocks_out"].numpy(), out.numpy()


def _per_token(timestep_frames: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    return timestep_frames.repeat_interleave(tokens_per_frame, dim=1)  # [B, T'] -> [B, L]


def make_tiny() -> None:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = WanTransformer3DModel(**TINY_CONFIG).float().eval()
    _perturb_norms(model, gen)
    tiny = OUT / "tiny"
    for old in tiny.glob("*") if tiny.exists() else []:
        old.unlink()
    # ~170 KB of float32 weights -> 3 shards and an index, like the published 14B.
    model.save_pretrained(str(tiny), safe_serialization=True, max_shard_size="80KB")

    c = TINY_CONFIG["in_channels"]
    latents = torch.randn(BATCH, c, FRAMES, HEIGHT, WIDTH, generator=gen)
    text = torch.randn(BATCH, TEXT_LEN, TINY_CONFIG["text_dim"], generator=gen)
    timestep = torch.tensor(TIMESTEP)
    blocks_out, output = _run(model, latents, timestep, text)
    frames = torch.tensor(TIMESTEP_FRAMES)
    tokens_per_frame = (HEIGHT // 2) * (WIDTH // 2)
    _, output_frames = _run(model, latents, _per_token(frames, tokens_per_frame), text)
    np.savez_compressed(
        OUT / "tiny_io.npz",
        latents=latents.numpy(),
        timestep=timestep.numpy(),
        text=text.numpy(),
        blocks_out=blocks_out,
        output=output,
        timestep_frames=frames.numpy(),
        output_frames=output_frames,
    )


def make_probes() -> None:
    """Reference outputs of single layers on inputs where their details show: LayerNorm and
    RMSNorm on inputs of variance ~1e-6 (the eps matters), tanh-GELU over [-6, 6], the
    timestep sinusoid and the 3D RoPE tables on a 5x7x9 grid."""
    from diffusers.models.embeddings import Timesteps
    from diffusers.models.normalization import FP32LayerNorm
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    gen = torch.Generator().manual_seed(SEED + 1)
    dim, eps = 32, TINY_CONFIG["eps"]
    x = 0.01 + 1e-3 * torch.randn(3, dim, generator=gen)  # mean 0.01, variance ~1e-6
    rms = torch.nn.RMSNorm(dim, eps=eps)
    with torch.no_grad():
        rms.weight.copy_(1.0 + 0.2 * torch.randn(dim, generator=gen))
        small = 1e-3 * torch.randn(3, dim, generator=gen)
        gelu_x = torch.linspace(-6.0, 6.0, 97)
        timesteps = torch.tensor([0.0, 125.0, 500.0, 1000.0])
        cos, sin = WanRotaryPosEmbed(16, (1, 2, 2), 1024)(torch.zeros(1, 4, 5, 14, 18))
        np.savez_compressed(
            OUT / "probes.npz",
            layernorm_x=x.numpy(),
            layernorm=FP32LayerNorm(dim, eps, elementwise_affine=False)(x).numpy(),
            rmsnorm_x=small.numpy(),
            rmsnorm_weight=rms.weight.numpy(),
            rmsnorm=rms(small).numpy(),
            gelu_x=gelu_x.numpy(),
            gelu=torch.nn.functional.gelu(gelu_x, approximate="tanh").numpy(),
            timesteps=timesteps.numpy(),
            temb=Timesteps(32, flip_sin_to_cos=True, downscale_freq_shift=0)(timesteps).numpy(),
            # [1, L, 1, E] tables, each angle repeated for a channel pair: keep one per pair
            rope_cos=cos[0, :, 0, 0::2].float().numpy(),
            rope_sin=sin[0, :, 0, 1::2].float().numpy(),
        )


def make_shapes() -> None:
    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN_1_3B_CONFIG)
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    doc = {
        "source": "diffusers.WanTransformer3DModel on the meta device",
        "diffusers_version": diffusers.__version__,
        "config": {**WAN_1_3B_CONFIG, "patch_size": list(WAN_1_3B_CONFIG["patch_size"])},
        "num_params": sum(int(np.prod(s)) for s in shapes.values()),
        "tensors": dict(sorted(shapes.items())),
    }
    (OUT / "wan2_1_1_3b_shapes.json").write_text(json.dumps(doc, indent=1) + "\n")


def check_export(directory: str) -> int:
    """Loads a sora_jax export with diffusers and compares it with the goldens."""
    model = WanTransformer3DModel.from_pretrained(directory).float().eval()
    io = np.load(OUT / "tiny_io.npz")
    latents, text = torch.from_numpy(io["latents"]), torch.from_numpy(io["text"])
    blocks_out, output = _run(model, latents, torch.from_numpy(io["timestep"]), text)
    tokens_per_frame = (HEIGHT // 2) * (WIDTH // 2)
    frames = _per_token(torch.from_numpy(io["timestep_frames"]), tokens_per_frame)
    _, output_frames = _run(model, latents, frames, text)
    worst = 0.0
    for name, got in [
        ("blocks_out", blocks_out),
        ("output", output),
        ("output_frames", output_frames),
    ]:
        want = io[name]
        err = float(np.abs(got - want).max() / np.abs(want).max())
        worst = max(worst, err)
        print(f"{name}: max |diffusers(export) - golden| / max |golden| = {err:.2e}")
    ok = worst < 1e-5
    print("export loads in diffusers and matches the goldens" if ok else "MISMATCH")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check_export", default="", help="a sora_jax export to verify")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float32)
    if args.check_export:
        return check_export(args.check_export)
    OUT.mkdir(parents=True, exist_ok=True)
    make_tiny()
    make_probes()
    make_shapes()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KB, diffusers {diffusers.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
