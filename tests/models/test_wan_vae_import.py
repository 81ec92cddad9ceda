"""Wan 2.1 VAE import and umT5 against PyTorch references (goldens written by
scripts/make_wan_vae_t5_goldens.py with diffusers / transformers; no PyTorch needed here).

golden/wan_vae: a tiny random diffusers `AutoencoderKLWan` (base_dim 4, z_dim 4, dim_mult
[1, 2, 2, 2], Wan 2.1's 4x8x8 causal structure), a 5-frame and a 1-frame clip, their
posterior means and the decodes of fixed latents, all in diffusers' `[B, C, T, H, W]`.
golden/umt5: a tiny random `UMT5EncoderModel` and its last hidden states for padded ids.
"""

import dataclasses
import json
import pathlib
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sora_jax.models import safetensors_io, t5, tokenizer, vae, vae_artifact, wan_vae_import

GOLDEN = pathlib.Path(__file__).parent / "golden"
WAN = GOLDEN / "wan_vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"

# Float32 tolerances (measured error in brackets). Encoder means |x| <= 0.26: atol 1e-5
# [1.3e-7]; Wan's RMS formula matters there: sora_jax's own 'rms' norm is off by 3e-5.
# Decoded pixels |x| <= 0.66 after ~40 layers: atol 1e-4 [1.5e-6; 'rms' norm: 9e-4].
# umT5 hidden states |x| <= 3.8: atol 2e-5 [1.7e-6].
ENCODE_ATOL, DECODE_ATOL, UMT5_ATOL = 1e-5, 1e-4, 2e-5


def _last(a: np.ndarray) -> np.ndarray:
    """diffusers' `[B, C, T, H, W]` -> sora_jax's `[B, T, H, W, C]`."""
    return np.moveaxis(a, 1, -1)


@pytest.fixture(scope="module")
def io() -> dict:
    return {k: _last(v) for k, v in np.load(WAN / "io.npz").items()}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wan_vae_artifact")
    assert wan_vae_import.cli(str(WAN), str(out)) == 0
    return out


@pytest.fixture(scope="module")
def tok(artifact):
    cfg = ml_collections.ConfigDict(dict(name="vae", path=str(artifact)))
    return tokenizer.build_tokenizer(cfg)


def test_converted_artifact_loads_as_the_vae_tokenizer(tok, artifact):
    """The artifact goes through `tokenizer.name='vae'`: Wan's config, norm and stats."""
    hf = json.loads((WAN / "config.json").read_text())
    assert tok.id == "causal_vae-wan2_1" and tok.latent_channels == hf["z_dim"] == 4
    assert tok.config == vae.VAEConfig(
        base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, norm="l2"
    )
    entry = tok.manifest_entry()
    assert entry["compression"] == [4, 8, 8]
    assert entry["hash"] == (artifact / "hash").read_text().strip()
    np.testing.assert_allclose(entry["normalization"]["mean"], hf["latents_mean"], rtol=1e-7)
    np.testing.assert_allclose(entry["normalization"]["std"], hf["latents_std"], rtol=1e-7)
    # Every tensor became a parameter of the right layout: counts and a spot check.
    src = load_file(str(WAN / WEIGHTS))
    n_params = sum(np.size(v) for v in src.values())
    assert sum(np.size(x) for x in _leaves(tok.params)) == n_params == 52851
    kernel = tok.params["decoder"]["up_blocks_1"]["resnets_0"]["conv_shortcut"]["kernel"]
    want = src["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"].transpose(2, 3, 4, 1, 0)
    np.testing.assert_array_equal(kernel, want)


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def test_streamed_export_equals_in_memory_export(tok, artifact, tmp_path):
    """`export_tokenizer_streamed` writes the very bytes (so hash) `export_tokenizer` does."""
    meta = json.loads((artifact / "config.json").read_text())
    digest = vae_artifact.export_tokenizer(
        tmp_path, tok.params, tok.config, tok.norm, name="wan2_1", info=meta["info"]
    )
    assert digest == tok.hash
    for f in vae_artifact.ARTIFACT_FILES:
        assert (tmp_path / f).read_bytes() == (artifact / f).read_bytes(), f


@pytest.mark.parametrize("frames", [5, 1])
def test_encode_matches_diffusers_posterior_mean(tok, io, frames):
    """`tok.encode` = `(mean - latents_mean) / latents_std`, mean = diffusers'
    `encode(x).latent_dist.mode()` (which encodes frame 0, then 4 frames at a time)."""
    mu, sigma = np.asarray(tok.norm.mean), np.asarray(tok.norm.std)
    mean = np.asarray(tok.encode(io[f"video{frames}"])) * sigma + mu
    assert mean.shape == io[f"mean{frames}"].shape
    np.testing.assert_allclose(mean, io[f"mean{frames}"], rtol=0, atol=ENCODE_ATOL)


@pytest.mark.parametrize("frames", [5, 1])
def test_decode_matches_diffusers(tok, io, frames):
    """`tok.decode((z - mu) / sigma)` = diffusers' `decode(z).sample` (which decodes one
    latent frame at a time with its feature cache)."""
    z = io[f"z{frames}"]
    latents = jnp.asarray((z - np.asarray(tok.norm.mean)) / np.asarray(tok.norm.std))
    want = io[f"decoded{frames}"]
    assert want.shape[1] == 1 + 4 * (z.shape[1] - 1) and np.abs(want).max() < 0.95  # unclamped
    np.testing.assert_allclose(tok.decode(latents), want, rtol=0, atol=DECODE_ATOL)


def test_l2_norm_is_wans_formula():
    """`norm='l2'` is `x / max(‖x‖, 1e-12) · sqrt(C) · scale`; 'rms' (the default, kept for
    existing artifacts) differs where activations are near zero."""
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    x[1] *= 1e-4  # |x|² ~ 1e-8 per channel, below 'rms''s epsilon 1e-6
    scale = np.linspace(0.5, 1.5, 8, dtype=np.float32)
    params = {"params": {"scale": scale}}
    got = vae.RMSNorm("l2").apply(params, jnp.asarray(x))
    want = x / np.linalg.norm(x, axis=-1, keepdims=True) * np.sqrt(8) * scale
    np.testing.assert_allclose(got, want, rtol=1e-6)
    rms = np.asarray(vae.RMSNorm("rms").apply(params, jnp.asarray(x)))
    assert np.abs(rms[1] - want[1]).max() > 0.1 and np.abs(rms[0] - want[0]).max() < 1e-5
    assert vae.VAEConfig().norm == "rms" and vae.PRESETS["wan2_1"].norm == "l2"
    old = {k: v for k, v in vae.VAEConfig().to_dict().items() if k != "norm"}
    assert vae.VAEConfig.from_dict(old).norm == "rms"  # artifacts written before the field
    with pytest.raises(ValueError, match="norm='layer'"):
        vae.VAEConfig(norm="layer")


def _broken_copy(tmp_path, edit) -> pathlib.Path:
    src = tmp_path / "src"
    shutil.copytree(WAN, src)
    tensors = load_file(str(src / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(src / WEIGHTS))
    return src


def _rename(tensors, old, new):
    tensors[new] = tensors.pop(old)


CONV = "decoder.up_blocks.2.resnets.0.conv1.weight"
CASES = {
    "renamed": (
        lambda t: _rename(t, CONV, CONV.replace("conv1", "conv_1")),
        [f"missing (1): {CONV}", f"unexpected (1): {CONV.replace('conv1', 'conv_1')}"],
    ),
    "missing": (
        lambda t: t.pop("encoder.mid_block.attentions.0.norm.gamma"),
        ["missing (1): encoder.mid_block.attentions.0.norm.gamma"],
    ),
    "wrong_shape": (
        lambda t: t.update({"quant_conv.weight": np.zeros((8, 8, 3, 1, 1), np.float32)}),
        ["wrong shape: quant_conv.weight is (8, 8, 3, 1, 1), the model expects (8, 8, 1, 1, 1)"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_report_names_each_mismatch(tmp_path, capsys, case):
    """Each fault is reported by tensor name from the headers; nothing is written."""
    edit, lines = CASES[case]
    src, out = _broken_copy(tmp_path, edit), tmp_path / "out"
    assert wan_vae_import.cli(str(src), str(out)) == 1
    err = capsys.readouterr().err
    for line in lines:
        assert line in err, err
    assert not out.exists()
    with pytest.raises(ValueError, match="does not match the VAE"):
        wan_vae_import.convert(src, out)


def test_config_refuses_what_the_vae_cannot_express():
    hf = json.loads((WAN / "config.json").read_text())
    config, norm = wan_vae_import.config_from_diffusers(hf)
    assert config.norm == "l2" and norm.std.tolist() == pytest.approx(hf["latents_std"])
    faults = {
        "patch_size": 2,  # Wan 2.2's patches need in_channels 12 (test_wan22_vae.py)
        "out_channels": 4,
        "attn_scales": [0.5],
        "dim_mult": [2, 2, 2, 2],
        "latents_mean": [0.0, 0.0],
    }
    for key, value in faults.items():
        with pytest.raises(ValueError, match=key):
            wan_vae_import.config_from_diffusers({**hf, key: value})


def test_full_size_wan2_1_names_and_shapes_all_match():
    """The name map at full size: every tensor of diffusers' default `AutoencoderKLWan`
    (Wan 2.1's VAE; names and shapes in wan2_1_shapes.json) matches the `wan2_1` preset."""
    doc = json.loads((WAN / "wan2_1_shapes.json").read_text())
    config, norm = wan_vae_import.config_from_diffusers(doc["config"])
    assert config == vae.PRESETS["wan2_1"]
    assert norm.mean.shape == norm.std.shape == (16,)
    headers = types.SimpleNamespace(shapes={k: tuple(v) for k, v in doc["shapes"].items()})
    params = wan_vae_import.abstract_params(config)
    _, report = wan_vae_import.check(headers, params, "wan2_1")
    assert report.ok and len(report.loaded) == len(doc["shapes"]), report
    assert sum(np.prod(s) for s in doc["shapes"].values()) == 126_892_531


def test_cli_usage_and_missing_directory(tmp_path, capsys):
    assert wan_vae_import.cli("", "") == 2
    assert wan_vae_import.cli(str(tmp_path), str(tmp_path / "out")) == 1
    assert "no config.json" in capsys.readouterr().err


def test_umt5_matches_transformers():
    """sora_jax's T5 encoder on the tiny UMT5EncoderModel's safetensors gives
    transformers' `last_hidden_state` at every position, padded ones included."""
    directory = GOLDEN / "umt5"
    data = np.load(directory / "io.npz")
    ids, mask = data["ids"], data["mask"]
    assert mask.sum(1).tolist() == [12, 7, 3]
    config = t5.T5Config.from_file(directory / "config.json")
    assert config.per_layer_position_bias and config.num_buckets == 8 and config.gated
    module = t5.T5Encoder(config)
    shapes = jax.eval_shape(module.init, jax.random.key(0), ids, mask)["params"]
    checkpoint = safetensors_io.Checkpoint(safetensors_io.checkpoint_files(directory))
    params, report = safetensors_io.load_params(
        checkpoint, t5.hf_name_map(config), shapes, t5.ignored_by_design, t5.ALIASES
    )
    assert report.ok and len(report.loaded) == 22, report
    hidden = module.apply({"params": params}, ids, mask)
    np.testing.assert_allclose(hidden, data["last_hidden_state"], rtol=0, atol=UMT5_ATOL)
    # Sensitivity: sharing block 0's position bias (T5's rule) breaks the match.
    shared = dataclasses.replace(config, per_layer_position_bias=False)
    params["block_1"].pop("relative_attention_bias")
    other = t5.T5Encoder(shared).apply({"params": params}, ids, mask)
    assert np.abs(np.asarray(other) - data["last_hidden_state"]).max() > 100 * UMT5_ATOL
