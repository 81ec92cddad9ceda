"""Wan 2.2 VAE import against diffusers goldens (scripts/make_wan22_goldens.py; no PyTorch).

golden/wan22/vae: a tiny random `AutoencoderKLWan` in Wan 2.2's configuration (residual
levels with parameter-free shortcuts, 2x2 pixel patches on 12 channels, a decoder wider than
the encoder; 4x16x16 compression), two clips, their posterior means and the decodes of
fixed latents, in diffusers' `[B, C, T, H, W]`. golden/wan22/shapes.json: the tensor list of
the published Wan 2.2 VAE (diffusers on the meta device).

Tolerances are Wan 2.1's (test_wan_vae_import.py): encode 1e-5, decode 1e-4 absolute.
"""

import json
import pathlib
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sora_jax.models import tokenizer, vae, vae_layers, wan_vae_import

GOLDEN = pathlib.Path(__file__).parent / "golden" / "wan22"
VAE_DIR = GOLDEN / "vae"
ENCODE_ATOL, DECODE_ATOL = 1e-5, 1e-4


def _last(a: np.ndarray) -> np.ndarray:
    """diffusers' `[B, C, T, H, W]` -> sora_jax's `[B, T, H, W, C]`."""
    return np.moveaxis(a, 1, -1)


@pytest.fixture(scope="module")
def io() -> dict:
    return {k: _last(v) for k, v in np.load(VAE_DIR / "io.npz").items()}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("wan22_vae")
    assert wan_vae_import.cli(str(VAE_DIR), str(out)) == 0
    return tokenizer.build_tokenizer(ml_collections.ConfigDict(dict(name="vae", path=str(out))))


def test_artifact_config_and_geometry(tok):
    hf = json.loads((VAE_DIR / "config.json").read_text())
    assert tok.id == "causal_vae-wan2_2" and tok.latent_channels == hf["z_dim"] == 4
    assert tok.config == vae.VAEConfig(
        base_dim=4,
        z_dim=4,
        dim_mult=(1, 2, 2, 2),
        num_res_blocks=1,
        norm="l2",
        patch_size=2,
        residual=True,
        decoder_base_dim=6,
    )
    assert (
        tok.manifest_entry()["compression"] == [4, 16, 16] == [4, *[hf["scale_factor_spatial"]] * 2]
    )
    n = sum(np.size(x) for x in jax.tree_util.tree_leaves(tok.params))
    assert n == 99830  # every tensor of the safetensors file (the shortcuts have none)


@pytest.mark.parametrize("frames", [5, 1])
def test_encode_matches_diffusers_posterior_mean(tok, io, frames):
    """diffusers encodes frame 0, then 4 frames at a time, with feature caches; sora_jax
    the whole clip: the averaging shortcut pairs frame 0 with a zero frame in both."""
    mu, sigma = np.asarray(tok.norm.mean), np.asarray(tok.norm.std)
    mean = np.asarray(tok.encode(io[f"video{frames}"])) * sigma + mu
    assert mean.shape == io[f"mean{frames}"].shape
    np.testing.assert_allclose(mean, io[f"mean{frames}"], rtol=0, atol=ENCODE_ATOL)


@pytest.mark.parametrize("frames", [5, 1])
def test_decode_matches_diffusers(tok, io, frames):
    """diffusers decodes one latent frame at a time (`first_chunk` drops the duplicating
    shortcut's first frame); sora_jax whole, and in chunks of one latent frame."""
    z = io[f"z{frames}"]
    latents = jnp.asarray((z - np.asarray(tok.norm.mean)) / np.asarray(tok.norm.std))
    want = io[f"decoded{frames}"]
    assert want.shape[1] == 1 + 4 * (z.shape[1] - 1) and np.abs(want).max() < 0.95
    np.testing.assert_allclose(tok.decode(latents), want, rtol=0, atol=DECODE_ATOL)
    chunked = vae.decode(tok.config, tok.params, tok.norm, latents, chunk_frames=1)
    np.testing.assert_allclose(chunked, want, rtol=0, atol=DECODE_ATOL)


def test_patchify_order_and_shortcuts_are_diffusers():
    """The pixel patch order is (c, dw, dh), as diffusers' `patchify`; swapping dh and dw
    would still invert but scramble channels. Shortcuts: shapes and round trip."""
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(1, 2, 4, 4, 3)
    p = np.asarray(vae.patchify_pixels(jnp.asarray(x), 2))
    # channel c·4 + dw·2 + dh of patch (i, j) is pixel (2i + dh, 2j + dw), colour c
    assert p[0, 0, 0, 1, 1 * 4 + 1 * 2 + 0] == x[0, 0, 0, 3, 1]
    np.testing.assert_array_equal(vae.unpatchify_pixels(jnp.asarray(p), 2), x)
    y = jnp.ones((1, 3, 4, 4, 8))
    down = vae_layers.avg_down(y, 16, 2, 2)
    assert down.shape == (1, 2, 2, 2, 16)
    # Groups of 4 consecutive (c, dt, dh, dw) values: each output channel averages one
    # (c, dt) over the 2x2 block, so on frame 0 (paired with a zero frame in front) the
    # channels alternate 0 (the padding) and 1; later frames are all ones.
    np.testing.assert_array_equal(down[0, 0, ..., 0::2], 0.0)
    np.testing.assert_array_equal(down[0, 0, ..., 1::2], 1.0)
    np.testing.assert_array_equal(down[0, 1], 1.0)
    up = vae_layers.dup_up(down, 8, 2, 2, frames=3)
    assert up.shape == (1, 3, 4, 4, 8)


def test_wan22_tensor_list_matches_the_preset():
    """All 196 tensors of the published Wan 2.2 VAE (diffusers on the meta device) map onto
    `vae.PRESETS['wan2_2']` by name and shape: 704,688,668 parameters."""
    doc = json.loads((GOLDEN / "shapes.json").read_text())["vae"]
    config, _ = wan_vae_import.config_from_diffusers(doc["config"])
    assert config == vae.PRESETS["wan2_2"] and config.spatial == 16 and config.temporal == 4
    headers = types.SimpleNamespace(shapes={k: tuple(v) for k, v in doc["tensors"].items()})
    params = wan_vae_import.abstract_params(config)
    _, report = wan_vae_import.check(headers, params, "wan2_2")
    assert report.ok and len(report.loaded) == len(doc["tensors"]) == 196, report
    n = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    assert n == doc["num_params"] == 704_688_668


def test_config_refusals_name_the_field():
    hf = json.loads((VAE_DIR / "config.json").read_text())
    for key, value in {"in_channels": 3, "scale_factor_spatial": 8, "attn_scales": [0.5]}.items():
        with pytest.raises(ValueError, match=key):
            wan_vae_import.config_from_diffusers({**hf, key: value})
