"""Makes tests/models/golden/wan22/: Wan 2.2 goldens from diffusers (PyTorch) on random weights.

    /work/peer/bin/python scripts/make_wan22_goldens.py  # any env with torch + diffusers

needs torch and diffusers (neither is a dependency of sora_jax; the tests read only what
this writes, ~0.5 MB). With fixed seeds it writes:

- `vae/`: a tiny `AutoencoderKLWan` in Wan 2.2's configuration (`is_residual=True`,
  `patch_size=2`, 12 pixel channels, a decoder wider than the encoder: base_dim 4,
  decoder_base_dim 6, z_dim 4, dim_mult [1, 2, 2, 2], one residual block per level:
  4x16x16 compression at toy width), norm scales and biases drawn at random, saved with
  `save_pretrained`; `io.npz` in diffusers' `[B, C, T, H, W]`: clips `video5`, `video1`,
  their posterior means `mean5`, `mean1`, latents `z5`, `z1` and decodes `decoded5`,
  `decoded1` (decoder.conv_out shrunk until no pixel is clamped).
- `ti2v/`: a tiny `WanTransformer3DModel` shaped like TI2V-5B (48 latent channels in and
  out, 2 layers, 2 heads of 16, FFN 64, text 32, freq 32), norms perturbed; `ti2v_io.npz`:
  one TI2V denoising input as `WanPipeline(expand_timesteps=True)` / the I2V pipeline build
  it for Wan 2.2 5B: latent frame 0 replaced by the clean first-frame latents, timesteps
  per token `mask · t` (0 on frame 0's tokens); `timestep_frames [B, T]` holds the same
  per latent frame, `output` the prediction.
- `high/`, `low/`, `experts_io.npz`: two tiny 16-channel transformers (the A14B experts'
  layout) run by diffusers' own `WanPipeline(transformer=high, transformer_2=low,
  boundary_ratio=0.875)` for 8 Euler steps of `FlowMatchEulerDiscreteScheduler`; forward
  hooks record, per step, the timestep, which expert ran (0 high, 1 low), its input latents
  and its prediction.
- `shapes.json`: every tensor name and shape of the published Wan 2.2 models, from the
  diffusers classes on the `meta` device (no weights): the TI2V-5B transformer, the A14B
  experts (`transformer` and `transformer_2` share one config) and the Wan 2.2 VAE, with
  the configs written below (those of the Wan-AI/*-Diffusers repositories).
"""

from __future__ import annotations

import json
import pathlib
import sys

import diffusers
import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/models/golden/wan22"

# Wan2.2-TI2V-5B-Diffusers/transformer/config.json.
TI2V_5B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=24,
    attention_head_dim=128,
    in_channels=48,
    out_channels=48,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=14336,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
# Wan2.2-T2V-A14B-Diffusers/transformer{,_2}/config.json: both experts, Wan 2.1 14B's shape.
A14B_EXPERT = dict(TI2V_5B, num_attention_heads=40, in_channels=16, out_channels=16)
A14B_EXPERT.update(ffn_dim=13824, num_layers=40)
A14B_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B-Diffusers/model_index.json (I2V-A14B: 0.9)
# Wan2.2-TI2V-5B-Diffusers/vae/config.json (the stats do not change the tensors).
WAN22_VAE = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)

TINY_VAE = dict(
    WAN22_VAE,
    base_dim=4,
    decoder_base_dim=6,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    latents_mean=[0.3, -0.2, 0.1, -0.4],
    latents_std=[1.5, 0.8, 2.0, 1.2],
)
TINY_DIT = dict(
    TI2V_5B,
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
)
TINY_EXPERT = dict(TINY_DIT, in_channels=16, out_channels=16)
TEXT_LEN = 7


def _randomize_norms_and_biases(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm scales and biases off their 1 / 0 init, so a dropped or misplaced one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or ".norm" in name or name.startswith("norm"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _save(model, out: pathlib.Path) -> None:
    for old in out.glob("*") if out.exists() else []:
        old.unlink()
    model.save_pretrained(str(out), safe_serialization=True)


def make_vae() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vae = AutoencoderKLWan(**TINY_VAE).float().eval()
    _randomize_norms_and_biases(vae, gen)
    video5 = torch.rand((2, 3, 5, 32, 48), generator=gen) * 2 - 1
    video1 = torch.rand((1, 3, 1, 16, 32), generator=gen) * 2 - 1
    z5 = torch.randn((2, 4, 2, 2, 3), generator=gen)
    z1 = torch.randn((1, 4, 1, 1, 2), generator=gen)
    with torch.no_grad():
        for _ in range(20):  # shrink the output conv until no decoded pixel is clamped
            decoded5, decoded1 = vae.decode(z5).sample, vae.decode(z1).sample
            if max(decoded5.abs().max(), decoded1.abs().max()) < 0.95:
                break
            vae.decoder.conv_out.weight.mul_(0.5)
            vae.decoder.conv_out.bias.mul_(0.5)
        else:
            sys.exit("decoded pixels stay clamped at +-1; change the seed")
        mean5 = vae.encode(video5).latent_dist.mode()
        mean1 = vae.encode(video1).latent_dist.mode()
    _save(vae, OUT / "vae")
    arrays = dict(video5=video5, video1=video1, mean5=mean5, mean1=mean1)
    arrays.update(z5=z5, z1=z1, decoded5=decoded5, decoded1=decoded1)
    np.savez_compressed(
        OUT / "vae" / "io.npz", **{k: v.numpy().astype(np.float32) for k, v in arrays.items()}
    )
    n = sum(p.numel() for p in vae.parameters())
    print(
        f"vae: {n} parameters; |mean5| {mean5.abs().max():.3f}, |dec5| {decoded5.abs().max():.3f}"
    )


def _tiny_transformer(config: dict, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).float().eval()
    _randomize_norms_and_biases(model, torch.Generator().manual_seed(seed + 100))
    return model


def make_ti2v() -> None:
    """One TI2V denoising input as Wan 2.2 5B's pipelines build it (`expand_timesteps`)."""
    model = _tiny_transformer(TINY_DIT, seed=1)
    _save(model, OUT / "ti2v")
    gen = torch.Generator().manual_seed(1)
    b, c, t, h, w = 2, TINY_DIT["in_channels"], 3, 4, 6
    noisy = torch.randn(b, c, t, h, w, generator=gen)
    condition = torch.randn(b, c, 1, h, w, generator=gen)  # the first frame's clean latents
    mask = torch.ones(b, c, t, h, w)
    mask[:, :, 0] = 0  # WanImageToVideoPipeline.prepare_latents, expand_timesteps=True
    latents = (1 - mask) * condition + mask * noisy
    timestep = torch.tensor([375.0, 875.0])  # exact in float32 after / 1000
    per_token = torch.stack([(mask[0, 0][:, ::2, ::2] * s).flatten() for s in timestep])
    text = torch.randn(b, TEXT_LEN, TINY_DIT["text_dim"], generator=gen)
    with torch.no_grad():
        output = model(latents, per_token, text, return_dict=False)[0]
        uniform = model(latents, timestep, text, return_dict=False)[0]
    frames = per_token.reshape(b, t, (h // 2) * (w // 2))[:, :, 0]
    np.savez_compressed(
        OUT / "ti2v_io.npz",
        latents=latents.numpy(),
        timestep=timestep.numpy(),
        timestep_tokens=per_token.numpy(),
        timestep_frames=frames.numpy(),
        text=text.numpy(),
        output=output.numpy(),
        output_uniform_t=uniform.numpy(),
    )


def make_experts() -> None:
    """Runs diffusers' WanPipeline with two experts and records each step."""
    high, low = _tiny_transformer(TINY_EXPERT, seed=2), _tiny_transformer(TINY_EXPERT, seed=3)
    _save(high, OUT / "high")
    _save(low, OUT / "low")
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

    handles = [
        high.register_forward_hook(hook(0), with_kwargs=True),
        low.register_forward_hook(hook(1), with_kwargs=True),
    ]
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        transformer=high,
        transformer_2=low,
        boundary_ratio=A14B_BOUNDARY_RATIO,
    )
    gen = torch.Generator().manual_seed(4)
    text = torch.randn(1, TEXT_LEN, TINY_EXPERT["text_dim"], generator=gen)
    latents = torch.randn(1, 16, 2, 4, 6, generator=gen)
    with torch.no_grad():
        pipe(
            prompt_embeds=text,
            negative_prompt_embeds=text,
            guidance_scale=1.0,  # one call per step (no CFG pair)
            height=32,
            width=48,
            num_frames=5,
            num_inference_steps=8,
            latents=latents,
            output_type="latent",
        )
    for h in handles:
        h.remove()
    np.savez_compressed(
        OUT / "experts_io.npz",
        boundary_ratio=np.float64(A14B_BOUNDARY_RATIO),
        num_train_timesteps=np.int64(pipe.scheduler.config.num_train_timesteps),
        text=text.numpy(),
        expert=np.array([s["expert"] for s in steps]),
        timestep=np.stack([s["timestep"] for s in steps]),  # [steps, B]
        latents=np.stack([s["latents"] for s in steps]),
        output=np.stack([s["output"] for s in steps]),
    )
    print("experts: " + ", ".join(f"t={s['timestep'][0]:.3f}->{s['expert']}" for s in steps))


def make_shapes() -> None:
    doc = {"source": "diffusers classes on the meta device", "version": diffusers.__version__}
    models = {
        "ti2v_5b": (WanTransformer3DModel, TI2V_5B),
        "a14b_expert": (WanTransformer3DModel, A14B_EXPERT),
        "vae": (AutoencoderKLWan, WAN22_VAE),
    }
    for key, (cls, config) in models.items():
        with torch.device("meta"):
            model = cls(**config)
        shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
        conf = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        doc[key] = {
            "class": cls.__name__,
            "config": conf,
            "num_params": sum(int(np.prod(s)) for s in shapes.values()),
            "tensors": dict(sorted(shapes.items())),
        }
        print(f"{key}: {len(shapes)} tensors, {doc[key]['num_params']:,} parameters")
    doc["a14b_boundary_ratio"] = A14B_BOUNDARY_RATIO
    (OUT / "shapes.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")


def main() -> int:
    torch.set_default_dtype(torch.float32)
    OUT.mkdir(parents=True, exist_ok=True)
    make_vae()
    make_ti2v()
    make_experts()
    make_shapes()
    (OUT / "reference.json").write_text(
        json.dumps(dict(torch=torch.__version__, diffusers=diffusers.__version__)) + "\n"
    )
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
