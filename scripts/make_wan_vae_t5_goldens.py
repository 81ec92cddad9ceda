"""Makes the Wan 2.1 VAE and umT5 goldens: tiny random reference models and their outputs.

    /work/venv-ref/bin/python scripts/make_wan_vae_t5_goldens.py  # any env with the three

needs torch, diffusers and transformers (none of them is a dependency of sora_jax; the
tests read only what this writes). It builds, with fixed seeds:

- `tests/models/golden/wan_vae/`: a tiny diffusers `AutoencoderKLWan` (base_dim 4, z_dim 4,
  dim_mult [1, 2, 2, 2], one residual block per level, temporal downsampling [False, True,
  True]: Wan 2.1's causal 4x8x8 structure at toy width) saved with `save_pretrained`
  (config.json + diffusion_pytorch_model.safetensors), and `io.npz` in diffusers' layout
  `[B, C, T, H, W]`: clips `video5` (5 frames) and `video1` (1 frame), their posterior
  means `mean5`, `mean1` (`encode(x).latent_dist.mode()`), latents `z5`, `z1` and their
  decodes `decoded5`, `decoded1` (`decode(z).sample`).
  `wan2_1_shapes.json`: every tensor name and shape of the full-size default
  `AutoencoderKLWan` (Wan 2.1's 127 M-parameter VAE) and its config, to check the import's
  name map at full size without its weights.
- `tests/models/golden/umt5/`: a tiny `UMT5EncoderModel` (d_model 32, 2 layers, 2 heads,
  d_kv 8, d_ff 64, vocab 100, 8 relative buckets) saved with `save_pretrained`, and
  `io.npz`: token ids `ids [B, S]`, padding mask `mask [B, S]` and `last_hidden_state`.

The norm scales (`gamma`, layer norm weights) and biases are drawn at random rather than
left at 1 and 0, so that a transposed or misplaced one cannot go unnoticed; the VAE's
`decoder.conv_out` is scaled so that decoded pixels stay inside (-1, 1) and diffusers'
final clamp hides nothing.
"""

import json
import pathlib
import sys

import diffusers
import numpy as np
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "models" / "golden"

VAE_CONFIG = dict(
    base_dim=4,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=[0.3, -0.2, 0.1, -0.4],
    latents_std=[1.5, 0.8, 2.0, 1.2],
)
UMT5_CONFIG = dict(
    vocab_size=100,
    d_model=32,
    num_layers=2,
    num_heads=2,
    d_kv=8,
    d_ff=64,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
)


def _randomize_norms_and_biases(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "layer_norm.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias") and "relative_attention_bias" not in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def make_wan_vae(out: pathlib.Path) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vae = diffusers.AutoencoderKLWan(**VAE_CONFIG).eval()
    _randomize_norms_and_biases(vae, gen)
    video5 = torch.rand((2, 3, 5, 16, 24), generator=gen) * 2 - 1
    video1 = torch.rand((1, 3, 1, 8, 16), generator=gen) * 2 - 1
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
    vae.save_pretrained(out, safe_serialization=True)
    arrays = dict(video5=video5, video1=video1, mean5=mean5, mean1=mean1)
    arrays.update(z5=z5, z1=z1, decoded5=decoded5, decoded1=decoded1)
    np.savez_compressed(
        out / "io.npz", **{k: v.numpy().astype(np.float32) for k, v in arrays.items()}
    )
    print(
        f"{out}: {sum(p.numel() for p in vae.parameters())} parameters; |mean5| max "
        f"{mean5.abs().max():.3f}, |decoded5| max {decoded5.abs().max():.3f}"
    )


def make_wan2_1_shapes(out: pathlib.Path) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialization
        vae = diffusers.AutoencoderKLWan()
    shapes = {k: list(v.shape) for k, v in vae.state_dict().items()}
    doc = {"config": dict(vae.config), "shapes": shapes}
    (out / "wan2_1_shapes.json").write_text(json.dumps(doc, indent=0, sort_keys=True) + "\n")


def make_umt5(out: pathlib.Path) -> None:
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5_CONFIG)).eval()
    _randomize_norms_and_biases(model, gen)
    lengths = [12, 7, 3]
    ids = torch.randint(2, UMT5_CONFIG["vocab_size"], (len(lengths), 12), generator=gen)
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    ids = torch.where(mask, ids, torch.zeros_like(ids))  # <pad> = 0 after each caption
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    model.save_pretrained(out, safe_serialization=True)
    np.savez_compressed(
        out / "io.npz",
        ids=ids.numpy().astype(np.int32),
        mask=mask.numpy(),
        last_hidden_state=hidden.numpy().astype(np.float32),
    )
    print(f"{out}: |last_hidden_state| max {hidden.abs().max():.3f}")


def main() -> None:
    versions = dict(
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
    )
    for name, make in [("wan_vae", make_wan_vae), ("umt5", make_umt5)]:
        out = ROOT / name
        out.mkdir(parents=True, exist_ok=True)
        make(out)
        if name == "wan_vae":
            make_wan2_1_shapes(out)
        (out / "reference.json").write_text(json.dumps(versions, indent=2) + "\n")
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{out}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
