"""Wan 2.1 transformer import/export against diffusers goldens (no PyTorch needed).

tests/models/golden/wan_dit/ is made by scripts/make_wan_goldens.py with diffusers'
`WanTransformer3DModel` (PyTorch, float32): a tiny random model (sharded safetensors +
config.json), its inputs and outputs, and the tensor list of the published 1.3B model.

Tolerances (float32 on both sides; the two frameworks differ only in summation order and
in how the RoPE / sinusoid angles are rounded): outputs must match to
`max|ours - torch| <= RTOL * max|torch|` with RTOL = 1e-5 (measured: 1.8e-7 on CPU). That
is stricter than a 1e-4 aim on purpose: an erf GELU instead of tanh's moves the tiny model's
output by only 2.6e-5. Layer probes (norm eps, GELU, sinusoid, RoPE) match to 2e-5 absolute.
"""

import functools
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from sora_jax import wan as wan_cli
from sora_jax.models import dit as dit_lib
from sora_jax.models import layers, rope, wan_export, wan_names
from sora_jax.models import wan_import as wan
from sora_jax.models.safetensors_io import get_path, set_path
from sora_jax.run import checkpoint as ckpt_lib

GOLDEN = pathlib.Path(__file__).parent / "golden" / "wan_dit"
TINY = GOLDEN / "tiny"
RTOL = 1e-5  # relative to the largest reference magnitude, float32


def _io():
    return dict(np.load(GOLDEN / "tiny_io.npz"))


@functools.lru_cache
def _runner(fields: tuple, shapes: wan.WanShapes):
    """`jit((params, x_t, t, text, mask) -> (v, hidden states after the last block))`."""
    model = dit_lib.VideoDiT(
        in_channels=shapes.in_channels,
        out_channels=shapes.out_channels,
        text_dim=shapes.text_dim,
        **dict(fields),
    )

    def run(params, x_t, t, text, mask):
        seen = {}

        def grab(next_fun, args, kwargs, context):
            # The stack's output is the input of the output head's norm.
            if context.module.name == "norm_out" and context.method_name == "__call__":
                seen["blocks_out"] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            v = model.apply({"params": params}, x_t, t, text, mask)
        return v, seen["blocks_out"]

    return jax.jit(run)


def _forward(params, fields, shapes, latents, t, text):
    """sora_jax VideoDiT on diffusers-layout inputs: latents [B, C, T, H, W] -> same layout."""
    run = _runner(tuple(sorted(fields.items())), shapes)
    x_t = jnp.asarray(latents).transpose(0, 2, 3, 4, 1)  # [B, C, T, H, W] -> [B, T, H, W, C]
    mask = jnp.ones(text.shape[:2], bool)  # Wan attends to every text position
    v, blocks_out = run(params, x_t, jnp.asarray(t), jnp.asarray(text), mask)
    return np.asarray(v).transpose(0, 4, 1, 2, 3), np.asarray(blocks_out)


def _assert_close(got, want, what):
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= RTOL, f"{what}: max |jax - torch| / max |torch| = {err:.2e} > {RTOL}"


def test_layers_match_torch_probes():
    """Single layers against PyTorch/diffusers on inputs where their details show."""
    p = dict(np.load(GOLDEN / "probes.npz"))
    close = lambda got, want: np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)  # noqa: E731
    # LayerNorm / RMSNorm on variance ~1e-6: eps 1e-5 instead of 1e-6 would be off by ~2x.
    x = jnp.asarray(p["layernorm_x"])
    close(layers.LayerNorm().apply({}, x), p["layernorm"])
    x = jnp.asarray(p["rmsnorm_x"]).reshape(3, 1, 2, 16)  # [B, L, N, E]: N·E = 32 together
    scale = jnp.asarray(p["rmsnorm_weight"]).reshape(2, 16)
    y = layers.HeadsRMSNorm().apply({"params": {"scale": scale}}, x)
    close(np.asarray(y).reshape(3, 32), p["rmsnorm"])
    close(jax.nn.gelu(jnp.asarray(p["gelu_x"])), p["gelu"])  # the MLP's GELU is tanh's
    close(nn.gelu(jnp.asarray(p["gelu_x"])), p["gelu"])  # and so is the text embedding's
    close(layers.timestep_embedding(jnp.asarray(p["timesteps"]) / 1000, 32), p["temb"])
    cos, sin = rope.rope_tables((5, 7, 9), rope.check_split(None, 16))  # head dim 16: (8, 4, 4)
    close(cos, p["rope_cos"])
    close(sin, p["rope_sin"])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_tiny_matches_diffusers(scan_layers):
    params, fields, shapes, report = wan.load_diffusers(TINY, scan_layers=scan_layers)
    assert report.ok and len(report.loaded) == 15 + 27 * 2 and not report.ignored
    io = _io()
    # diffusers takes 1000 t; sora_jax t in [0, 1] (timesteps chosen exact in float32).
    out, blocks_out = _forward(
        params, fields, shapes, io["latents"], io["timestep"] / 1000, io["text"]
    )
    assert out.shape == io["output"].shape
    _assert_close(blocks_out, io["blocks_out"], "hidden states after the last block")
    _assert_close(out, io["output"], "output")
    # Per-frame timesteps [B, T] (diffusers: per token, each token its frame's time).
    out_f, _ = _forward(
        params, fields, shapes, io["latents"], io["timestep_frames"] / 1000, io["text"]
    )
    _assert_close(out_f, io["output_frames"], "output with per-frame timesteps")
    assert np.abs(out_f - out).max() > 10 * RTOL * np.abs(out).max()  # the times matter


def test_every_tensor_changes_the_output():
    """Each diffusers tensor reaches the model: setting any one to a constant moves the output."""
    params, fields, shapes, _ = wan.load_diffusers(TINY)
    io = _io()
    args = (io["latents"], io["timestep"] / 1000, io["text"])
    base, _ = _forward(params, fields, shapes, *args)
    for r in wan_names.name_map(fields["num_layers"], True, False):
        broken = jax.tree.map(np.copy, params)
        set_path(broken, r.path, np.zeros_like(get_path(params, r.path)) + 0.5)
        out, _ = _forward(broken, fields, shapes, *args)
        assert np.abs(out - base).max() > 1e-4, f"{r.name} does not affect the output"


@pytest.mark.parametrize("scan_layers", [False, True])
def test_export_reimport_is_identity(tmp_path, scan_layers):
    params, fields, _, _ = wan.load_diffusers(TINY, scan_layers=scan_layers)
    # Small shards: the export's index and sharding are exercised too.
    config = wan_export.export_diffusers(params, fields, tmp_path, max_shard_bytes=60_000)
    assert (tmp_path / wan.INDEX_FILE).exists() and len(wan.diffusers_files(tmp_path)) > 1
    original = json.loads((TINY / "config.json").read_text())
    for key, value in config.items():
        if key != "_class_name":
            assert original[key] == value, key
    # The exported tensors are bit-identical to the diffusers originals...
    want, got = {}, {}
    for f in wan.diffusers_files(TINY):
        want.update(load_file(f))
    for f in wan.diffusers_files(tmp_path):
        got.update(load_file(f))
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # ... and re-import gives back the same tree.
    again, fields2, _, _ = wan.load_diffusers(tmp_path, scan_layers=scan_layers)
    assert fields2 == fields
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_export_bfloat16_single_file(tmp_path):
    params, fields, _, _ = wan.load_diffusers(TINY)
    wan_export.export_diffusers(params, fields, tmp_path, dtype="bfloat16")
    assert wan.diffusers_files(tmp_path) == [tmp_path / wan.SINGLE_FILE]
    again, _, _, _ = wan.load_diffusers(tmp_path)
    # bfloat16 keeps 8 bits of mantissa: relative error <= 2^-9 per element.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2**-8, atol=0), again, params)


def test_export_refuses_non_wan_models():
    fields, shapes = wan.fields_from_diffusers(json.loads((TINY / "config.json").read_text()))
    swiglu = dict(fields, mlp="swiglu")
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), wan.abstract_params(swiglu, shapes))
    with pytest.raises(ValueError, match="model.mlp='swiglu'"):
        wan_export.export_diffusers(params, swiglu, "/nonexistent")


def test_import_writes_init_from_checkpoint(tmp_path):
    resolved = wan_cli.import_diffusers(TINY, tmp_path, scan_layers=True)
    assert resolved["model"]["preset"] is None  # tiny sizes match no preset
    assert resolved["data"] == {"latent_channels": 4, "cond_channels": 0, "text_dim": 32}
    saved = json.loads((tmp_path / wan_cli.MODEL_CONFIG_FILE).read_text())
    assert saved["model"] == resolved["model"]
    # The resolved config builds the model whose tree the trainer restores into.
    model = dit_lib.build_model(saved["model"], in_channels=4, text_dim=32)
    inputs = (
        jnp.zeros((1, 1, 4, 4, 4)),
        jnp.zeros((1,)),
        jnp.zeros((1, 3, 32)),
        jnp.ones((1, 3), bool),
    )
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu),
        jax.eval_shape(lambda: jax.tree.map(lambda x: x, model.init(jax.random.key(0), *inputs))),
    )
    abstract = nn.meta.unbox(abstract["params"])
    fresh = jax.tree.map(lambda s: jnp.full(s.shape, 7.0, s.dtype), abstract)
    loaded, report = ckpt_lib.load_for_init(tmp_path, abstract, fresh)
    assert not report["missing"] and not report["unexpected"] and not report["reshaped"]
    want, _, _, _ = wan.load_diffusers(TINY, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), want)
    # Export straight from the checkpoint directory (fields from model_config.json).
    params, fields, _ = wan_cli.load_run_params(tmp_path)
    out = tmp_path / "export"
    wan_export.export_diffusers(params, fields, out)
    again, _, _, _ = wan.load_diffusers(out, scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, again, want)


def test_report_names_every_problem(tmp_path):
    src = tmp_path / "broken"
    shutil.copytree(TINY, src)
    tensors = {}
    for f in wan.diffusers_files(src):
        tensors.update(load_file(f))
        f.unlink()
    (src / wan.INDEX_FILE).unlink()
    del tensors["blocks.1.attn2.to_k.bias"]
    tensors["blocks.0.ffn.net.2.weight"] = tensors["blocks.0.ffn.net.2.weight"][:, :-1].copy()
    tensors["blocks.2.norm2.weight"] = tensors["blocks.1.norm2.weight"]  # an extra layer
    tensors["blocks.0.attn2.norm_added_q.weight"] = tensors["blocks.1.norm2.weight"]  # ignored
    save_file(tensors, str(src / wan.SINGLE_FILE))
    with pytest.raises(ValueError) as err:
        wan.load_diffusers(src)
    msg = str(err.value)
    assert "missing (1): blocks.1.attn2.to_k.bias" in msg
    assert "unexpected (1): blocks.2.norm2.weight" in msg
    assert "wrong shape: blocks.0.ffn.net.2.weight is (32, 63), the model expects (32, 64)" in msg
    assert "ignored by design (1): blocks.0.attn2.norm_added_q.weight" in msg


def test_preset_must_match(tmp_path):
    with pytest.raises(ValueError, match="preset 'wan2_1_1_3b'.*dim: preset 1536, checkpoint 32"):
        wan_cli.import_diffusers(TINY, tmp_path, preset="wan2_1_1_3b")
    assert not (tmp_path / "checkpoints").exists()  # failed before writing anything


@pytest.mark.parametrize("scan_layers", [False, True])
def test_wan2_1_1_3b_preset_maps_onto_published_tensors(scan_layers):
    """The 1.3B preset's tree (eval_shape, nothing allocated) <-> the published tensor list."""
    doc = json.loads((GOLDEN / "wan2_1_1_3b_shapes.json").read_text())
    published = {k: tuple(v) for k, v in doc["tensors"].items()}
    fields, shapes = wan.fields_from_diffusers(doc["config"])
    assert wan.resolve_model_config(fields) == {
        "preset": "wan2_1_1_3b",
        **{k: v for k, v in fields.items() if k not in dit_lib.PRESETS["wan2_1_1_3b"]},
    }
    preset = dit_lib.model_fields({"preset": "wan2_1_1_3b", "scan_layers": scan_layers})
    abstract = wan.abstract_params(preset, wan.WanShapes(16, 16, 4096))
    leaves = wan_names.leaf_paths(abstract)
    ours = {}
    for r in wan_names.name_map(30, True, scan_layers):
        shape = tuple(leaves[r.path].shape)
        ours[r.name] = wan_names.hf_shape(
            r.kind, shape[1:] if scan_layers and r.layer is not None else shape, (1, 2, 2)
        )
    assert sorted(set(published) - set(ours)) == [] and sorted(set(ours) - set(published)) == []
    assert {k: v for k, v in ours.items() if published[k] != v} == {}
    # No extra params either.
    wan_names.check_covered(wan_names.name_map(30, True, scan_layers), leaves)
    assert sum(int(np.prod(s.shape)) for s in leaves.values()) == doc["num_params"]


def test_cli_import(tmp_path):
    out = tmp_path / "init"
    proc = subprocess.run(
        [sys.executable, "-m", "sora_jax.wan", "import", f"--src={TINY}", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "69 tensors loaded" in proc.stdout and f"--init_from={out}" in proc.stdout
    assert "convert: 100%" in proc.stderr  # the progress bar
    assert ckpt_lib.resolve_checkpoint(out) == (out / "checkpoints", 0)
