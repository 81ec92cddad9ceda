"""Makes tests/evaluation/golden/i3d/: I3D goldens from an independent PyTorch implementation.

The reference is the PyTorch port of the kinetics-i3d release as shipped in the `cd-fvd`
package (`cdfvd.third_party.i3d.pytorch_i3d.InceptionI3d`, the code FVD implementations
load `i3d_pretrained_400.pt` into). Run with an environment that has torch, numpy,
safetensors and cd-fvd (no jax needed; sora_jax itself depends on none of them):

    python -m venv /tmp/venv-ref
    /tmp/venv-ref/bin/pip install torch numpy safetensors requests tqdm
    /tmp/venv-ref/bin/pip install --no-deps cd-fvd
    /tmp/venv-ref/bin/python scripts/make_i3d_goldens.py

The network is the reference's own code with every width divided by `WIDTH_DIVISOR` (8;
the RGB input and the 400 classes kept), so the random weights ship in ~1 MB: the wiring,
padding, pools, batch norm and head are the reference's. It writes:

- `state_dict.safetensors`: the reference's `state_dict()` (its tensor names and layouts,
  those of the published checkpoints), random weights: PyTorch's default conv init, batch
  norm statistics set from a calibration clip (so activations stay O(1) through 57
  layers) then perturbed, affine weights and biases perturbed away from 1 and 0.
- `io.npz`: `video_u8 [B, T, h, w, 3]` uint8 (the input before an exact nearest-neighbour
  upsampling by `UPSAMPLE` in space and the map `x / 127.5 - 1`: see `upsample`),
  `logits [B, 400]` (`forward`: the 2x7x7 pooled logits averaged over time),
  `pool [B, D]` (`extract_features` averaged over its temporal positions), `bn_eps` (the
  reference's batch-norm eps), `width_divisor`; and the reference's clip preprocessing
  (`preprocess_i3d`: bilinear, half-pixel centres, no antialiasing, then [-1, 1]) of
  `resize_u8 [2, 5, 40, 56, 3]` to 24 x 24 as `resize_out [2, 5, 24, 24, 3]`.

T = 24 frames of 224 x 224 give a 3x7x7 last feature map, so the head's 2x7x7 pool has two
temporal positions: the averaging over positions is exercised, not only a global mean.
"""

from __future__ import annotations

import pathlib

import numpy as np
import safetensors.torch
import torch
from cdfvd.third_party.i3d import pytorch_i3d
from cdfvd.third_party.i3d.utils import preprocess_i3d

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/evaluation/golden/i3d"
SEED = 0
WIDTH_DIVISOR = 8
BATCH, FRAMES, LOW_RES, UPSAMPLE = 2, 24, 28, 8  # 28 * 8 = 224


def upsample(video_u8: np.ndarray) -> np.ndarray:
    """uint8 `[B, T, h, w, 3]` -> float32 `[B, T, 8h, 8w, 3]` in [-1, 1], exactly."""
    big = video_u8.repeat(UPSAMPLE, axis=2).repeat(UPSAMPLE, axis=3)
    return big.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


_UNIT_INIT = pytorch_i3d.Unit3D.__init__


def _narrow_unit_init(self, in_channels, output_channels, *args, **kwargs):
    """The reference's Unit3D with its channel counts divided by WIDTH_DIVISOR, except the
    RGB input and the logits' classes."""
    if in_channels != 3:
        in_channels //= WIDTH_DIVISOR
    if kwargs.get("name") != "logits":
        output_channels //= WIDTH_DIVISOR
    _UNIT_INIT(self, in_channels, output_channels, *args, **kwargs)


def build() -> torch.nn.Module:
    pytorch_i3d.Unit3D.__init__ = _narrow_unit_init  # every Unit3D the model builds
    torch.manual_seed(SEED)
    model = pytorch_i3d.InceptionI3d(400, in_channels=3)
    rng = np.random.default_rng(SEED + 1)
    calib = upsample(rng.integers(0, 256, (2, FRAMES, LOW_RES, LOW_RES, 3), dtype=np.uint8))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    for bn in bns:  # running statistics := the calibration batch's
        bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(calib).permute(0, 4, 1, 2, 3))
        gen = torch.Generator().manual_seed(SEED + 2)
        for bn in bns:
            c = bn.num_features
            bn.running_mean += 0.1 * torch.randn(c, generator=gen) * bn.running_var.sqrt()
            bn.running_var *= 0.8 + 0.4 * torch.rand(c, generator=gen)
            bn.weight.copy_(0.5 + torch.rand(c, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
        model.logits.conv3d.bias.copy_(0.1 * torch.randn(400, generator=gen))
    return model.eval()


def main() -> None:
    model = build()
    rng = np.random.default_rng(SEED)
    video_u8 = rng.integers(0, 256, (BATCH, FRAMES, LOW_RES, LOW_RES, 3), dtype=np.uint8)
    x = torch.from_numpy(upsample(video_u8)).permute(0, 4, 1, 2, 3)  # [B, 3, T, H, W]
    with torch.no_grad():
        logits = model(x)  # [B, 400]
        feats = model.extract_features(x)  # [B, D, P_t, 1, 1]
    assert feats.shape[2:] == (2, 1, 1), feats.shape  # two temporal positions of the head
    pool = feats.mean(dim=(2, 3, 4))
    OUT.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, OUT / "state_dict.safetensors")
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)}
    assert len(eps) == 1, eps
    resize_u8 = rng.integers(0, 256, (2, 5, 40, 56, 3), dtype=np.uint8)
    resized = preprocess_i3d(resize_u8, target_resolution=(24, 24))  # [B, 3, T, 24, 24]
    np.savez_compressed(
        OUT / "io.npz",
        resize_u8=resize_u8,
        resize_out=resized.permute(0, 2, 3, 4, 1).numpy(),
        video_u8=video_u8,
        logits=logits.numpy(),
        pool=pool.numpy(),
        bn_eps=np.float64(eps.pop()),
        width_divisor=np.int64(WIDTH_DIVISOR),
    )
    n = sum(v.numel() for v in state.values())
    print(f"wrote {OUT}: {len(state)} tensors, {n} numbers; logits std {logits.std():.3f}")


if __name__ == "__main__":
    main()
