"""The causal 3D VAE: shapes, causality, chunked and tiled decoding, normalization, the
artifact and the `vae` tokenizer, logical names, and a short training run."""

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from sora_jax.config import ConfigError
from sora_jax.models import tokenizer, vae, vae_artifact
from sora_jax.run import validate as validate_lib
from sora_jax.training import loop
from sora_jax.training import metrics as metrics_lib

TINY = vae.PRESETS["tiny"]  # 8x spatial, 4x temporal
# Two levels and no extra residual blocks: a decoder halo (4) smaller than the test latents.
SMALL = vae.VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=0,
                      temporal_downsample=(True,))  # fmt: skip
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_params():
    return vae.init_params(TINY, jax.random.key(0))


def _norm(c):
    return vae.LatentNorm.identity(c)


def _video(shape, seed=0):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("frames", [1, 5, 17, 33])
@pytest.mark.parametrize("hw", [(32, 32), (16, 48), (40, 24)])
def test_encode_decode_shapes(tiny_params, frames, hw):
    h, w = hw
    video = jax.ShapeDtypeStruct((2, frames, h, w, 3), jnp.float32)
    z = jax.eval_shape(lambda v: vae.encode(TINY, tiny_params, _norm(4), v), video)
    assert z.shape == (2, 1 + (frames - 1) // 4, h // 8, w // 8, 4)
    x = jax.eval_shape(lambda lat: vae.decode(TINY, tiny_params, _norm(4), lat), z)
    assert x.shape == video.shape


def test_causality_and_first_frame_alone(tiny_params):
    x = _video((1, 9, 16, 24, 3))
    x2 = x.at[:, 5:].set(_video((1, 4, 16, 24, 3), seed=1))  # frames after t = 4 change
    z = vae.encode(TINY, tiny_params, _norm(4), jnp.concatenate([x, x2]))
    # Latent j sees pixel frames <= 4j: latents 0 and 1 are unchanged, latent 2 is not.
    np.testing.assert_array_equal(z[0, :2], z[1, :2])
    assert float(jnp.abs(z[0, 2] - z[1, 2]).max()) > 1e-3
    # Frame 0 is encoded alone: as an image (T = 1) it gives the same latent frame.
    z_img = vae.encode(TINY, tiny_params, _norm(4), x[:, :1])
    np.testing.assert_allclose(z_img[0, 0], z[0, 0], atol=1e-5)

    lat = _video((1, 3, 2, 3, 4), seed=2)
    lat2 = lat.at[:, 2:].set(_video((1, 1, 2, 3, 4), seed=3))  # latent frames after 1 change
    y = vae.decode(TINY, tiny_params, _norm(4), jnp.concatenate([lat, lat2]))
    # Decoded frame 4j sees latents <= j: frames 0..4 are unchanged, frames 5..8 are not.
    np.testing.assert_array_equal(y[0, :5], y[1, :5])
    assert float(jnp.abs(y[0, 5:] - y[1, 5:]).max()) > 1e-3


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_decode_equals_whole(tiny_params, chunk):
    lat = _video((1, 5, 2, 3, 4), seed=4)
    whole = vae.decode(TINY, tiny_params, _norm(4), lat)
    chunked = vae.decode(TINY, tiny_params, _norm(4), lat, chunk_frames=chunk)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)
    # Control: the same chunks with the carried cache zeroed (the past dropped) differ.
    stem, up, frames = {}, None, []
    for i in range(5):
        feat, stem = vae._apply_cached(TINY, "decode_stem", tiny_params, stem, lat[:, i : i + 1])
        y, up = vae._apply_cached(TINY, "decode_up", tiny_params, up, feat)
        stem, up = jax.tree.map(jnp.zeros_like, stem), jax.tree.map(jnp.zeros_like, up)
        frames.append(y)
    assert float(jnp.abs(jnp.clip(jnp.concatenate(frames, 1), -1, 1) - whole).max()) > 1e-2


def test_tiled_decode_equals_whole():
    params = vae.init_params(SMALL, jax.random.key(1))
    assert vae.decoder_halo(SMALL) == 4  # 2 + 1/2 + 2·1/2 + 1/2: see decoder_halo
    lat = _video((1, 2, 4, 12, 4), seed=5)
    whole = vae.decode(SMALL, params, _norm(4), lat)
    tiled = vae.decode(SMALL, params, _norm(4), lat, chunk_frames=1, tile=4)
    np.testing.assert_allclose(tiled, whole, atol=1e-4)
    # Control: a halo below the receptive radius leaves seams.
    seams = vae.decode(SMALL, params, _norm(4), lat, tile=4, halo=1)
    assert float(jnp.abs(seams - whole).max()) > 1e-3


def test_measured_normalization_standardizes_latents(tiny_params):
    from sora_jax.data import synthetic

    clips = np.stack([synthetic.synthetic_clip(i, 0, 5, 32, 32)["video"] for i in range(8)])
    norm = vae_artifact.measure_norm(TINY, tiny_params, [clips[:4], clips[4:]])
    z = np.asarray(vae.encode(TINY, tiny_params, norm, clips)).reshape(-1, 4)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-3)
    # And decode inverts the normalization: same pixels as decoding unnormalized means.
    raw = vae.encode(TINY, tiny_params, _norm(4), clips[:1])
    np.testing.assert_allclose(
        vae.decode(TINY, tiny_params, norm, z.reshape(8, 2, 4, 4, 4)[:1]),
        vae.decode(TINY, tiny_params, _norm(4), raw),
        atol=1e-4,
    )


@pytest.fixture(scope="module")
def artifact(tiny_params, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    norm = vae.LatentNorm(jnp.arange(4.0) / 10, jnp.linspace(0.5, 2.0, 4))
    digest = vae_artifact.export_tokenizer(path, tiny_params, TINY, norm, name="test")
    return path, norm, digest


def test_export_load_round_trip(tiny_params, artifact):
    path, norm, digest = artifact
    cfg = ml_collections.ConfigDict(dict(name="vae", path=str(path), decode_chunk_frames=1))
    tok = tokenizer.build_tokenizer(cfg)
    assert isinstance(tok, vae_artifact.VAETokenizer) and tok.hash == digest and len(digest) == 64
    assert tok.id == "causal_vae-test" and tok.latent_channels == 4
    x = np.asarray(_video((1, 17, 16, 24, 3), seed=6))  # latents [1, 5, 2, 3, 4], as above
    np.testing.assert_array_equal(tok.encode(x), vae.encode(TINY, tiny_params, norm, x))
    entry = tok.manifest_entry()
    assert entry["compression"] == [4, 8, 8] and entry["hash"] == digest
    np.testing.assert_allclose(entry["normalization"]["std"], np.linspace(0.5, 2.0, 4))
    assert tok.decode(tok.encode(x)).shape == x.shape
    assert vae_artifact.load_tokenizer(path).hash == digest  # the same files, the same hash


def test_tampered_artifact_and_missing_path_are_refused(artifact, tmp_path):
    path, _, _ = artifact
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in (*vae_artifact.ARTIFACT_FILES, "hash"):
        (copy / f).write_bytes((path / f).read_bytes())
    meta = json.loads((copy / "config.json").read_text())
    meta["architecture"]["z_dim"] = 8
    (copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="re-export"):
        vae_artifact.load_tokenizer(copy)
    with pytest.raises(ValueError, match="tokenizer.path is empty"):
        tokenizer.build_tokenizer(ml_collections.ConfigDict(dict(name="vae", path="")))
    with pytest.raises(FileNotFoundError, match="lacks"):
        vae_artifact.load_tokenizer(tmp_path / "nowhere")


def test_check_frames_and_latent_shape(artifact):
    tok = vae_artifact.load_tokenizer(artifact[0])
    with pytest.raises(ValueError, match=r"frames=6 is not of the form 1 \+ 4k.*5 or 9"):
        tok.check_frames(6)
    with pytest.raises(ValueError, match=r"frames=0 .* are 1$"):
        tok.check_frames(0)
    tok.check_frames(17)
    assert tok.latent_shape(17, 32, 48) == (5, 4, 6, 4)
    with pytest.raises(ValueError, match="height=30"):
        tok.latent_shape(5, 30, 32)


def test_every_parameter_has_logical_names():
    is_box = lambda v: isinstance(v, nn.LogicallyPartitioned)  # noqa: E731
    boxed = jax.eval_shape(lambda k: vae.init_params(TINY, k, boxed=True), jax.random.key(0))
    flax_init = jax.eval_shape(vae.CausalVAE(TINY).init, jax.random.key(0), vae.example_input(TINY))
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
    ref = jax.tree_util.tree_leaves_with_path(flax_init["params"], is_leaf=is_box)
    assert [p for p, _ in leaves] == [p for p, _ in ref]  # same tree as the modules' init
    for (path, leaf), (_, want) in zip(leaves, ref):
        assert is_box(leaf) and len(leaf.names) == leaf.value.ndim, path
        assert leaf.names == want.names and leaf.value.shape == want.value.shape, path
        assert leaf.value.dtype == jnp.float32, path
        if path[-1].key == "kernel":
            assert leaf.names[-2:] == ("conv_in", "conv_out"), path


def test_init_distribution():
    p = vae.init_params(vae.PRESETS["tiny"], jax.random.key(3))
    k = p["decoder"]["up_blocks_0"]["resnets_0"]["conv1"]["kernel"]  # [3, 3, 3, 16, 16]
    assert abs(float(k.std()) * math.sqrt(27 * 16) - 1.0) < 0.05  # lecun: var = 1 / fan_in
    assert not p["decoder"]["mid_block"]["attentions_0"]["proj"]["kernel"].any()  # zero init
    assert not p["encoder"]["conv_in"]["bias"].any()
    assert (p["encoder"]["norm_out"]["scale"] == 1).all()


def test_wan2_1_preset_has_wan_vae_size():
    cfg = vae.PRESETS["wan2_1"]
    shapes = jax.eval_shape(vae.CausalVAE(cfg).init, jax.random.key(0), vae.example_input(cfg))
    count = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
    assert round(count / 1e6) == 127  # the Wan 2.1 report's 127M-parameter Wan-VAE
    assert (cfg.temporal, cfg.spatial, cfg.z_dim) == (4, 8, 16)


def _experiment(arg):
    spec = importlib.util.spec_from_file_location("vae_experiment", ROOT / "experiments/vae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_training_the_vae_reduces_loss_and_exports(tmp_path):
    config = _experiment("tiny,steps=12")
    config.model.preset = None  # SMALL: the tiny preset's train step compiles for a minute
    for field, value in vars(SMALL).items():
        config.model[field] = value
    config.data.source.num_clips = 8  # = the batch: every step sees the same 8 clips
    config.log_every_steps = 1
    config.optimizer.lr = 3e-3
    config.data.eval_clips = 8
    config.export.norm_clips = 8
    summary = loop.train(config, tmp_path)  # the shared loop, by model.name
    losses = [m["train/loss"] for m in metrics_lib.read_metrics(tmp_path) if "train/loss" in m]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * losses[0], losses
    assert np.isfinite(summary["eval/psnr"])
    tok = vae_artifact.load_tokenizer(tmp_path / "tokenizer")
    assert tok.hash == summary["hash"] and tok.latent_shape(5, 16, 16) == (3, 8, 8, 4)


def test_vae_config_validation_names_fields():
    config = _experiment("tiny")
    config.data.frames = 6
    config.data.width = 20
    config.loss.recon = "l3"
    with pytest.raises(ConfigError) as err:
        validate_lib.validate_vae(config)
    for field in ("data.frames=6", "data.width=20", "loss.recon='l3'"):
        assert field in str(err.value)
    config = _experiment("tiny")
    config.model.dim_mult = (1, 2)  # the tiny preset's 3 temporal flags no longer fit
    with pytest.raises(ConfigError, match="temporal_downsample"):
        validate_lib.validate_vae(config)


def test_a_preset_without_weights_plans_shapes_but_refuses_to_encode():
    cfg = ml_collections.ConfigDict(dict(name="vae", path="", preset="wan2_1"))
    tok = tokenizer.build_tokenizer(cfg)
    assert tok.latent_shape(81, 480, 832) == (21, 60, 104, 16)  # Wan 2.1 at 480p
    assert tok.manifest_entry()["compression"] == [4, 8, 8]
    with pytest.raises(ValueError, match="no weights"):
        tok.encode(np.zeros((1, 5, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="tokenizer.path"):
        tokenizer.build_tokenizer(ml_collections.ConfigDict(dict(name="vae", path="")))
