"""Wan 2.2 transformers against diffusers goldens (scripts/make_wan22_goldens.py; no PyTorch).

golden/wan22/ti2v: a tiny `WanTransformer3DModel` shaped like TI2V-5B (48 channels) and one
TI2V input as Wan 2.2 5B's pipelines build it (latent frame 0 = the clean first frame,
per-token timesteps `mask · t`). golden/wan22/high, low, experts_io.npz: two tiny experts
run by diffusers' `WanPipeline(boundary_ratio=0.875)`, every step recorded (timestep,
expert, input, prediction). golden/wan22/shapes.json: the published tensor lists.

Tolerance: Wan 2.1's (test_wan_import.py), `max|ours - torch| <= 1e-5 max|torch|`.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import conditioning
from sora_jax.models import dit as dit_lib
from sora_jax.models import wan_experts, wan_names
from sora_jax.models import wan_import as wan

GOLDEN = pathlib.Path(__file__).parent / "golden" / "wan22"
RTOL = 1e-5


@functools.lru_cache
def _runner(fields: tuple, shapes: wan.WanShapes):
    model = dit_lib.VideoDiT(
        in_channels=shapes.in_channels,
        out_channels=shapes.out_channels,
        text_dim=shapes.text_dim,
        **dict(fields),
    )
    return jax.jit(
        lambda params, x, t, text, mask: model.apply({"params": params}, x, t, text, mask)
    )


def _forward(params, fields, shapes, latents, t, text):
    """VideoDiT on diffusers-layout latents `[B, C, T, H, W]`, all text positions attended."""
    run = _runner(tuple(sorted(fields.items())), shapes)
    x_t = jnp.asarray(latents).transpose(0, 2, 3, 4, 1)  # -> [B, T, H, W, C]
    mask = jnp.ones(text.shape[:2], bool)
    v = run(params, x_t, jnp.asarray(t, jnp.float32), jnp.asarray(text), mask)
    return np.asarray(v).transpose(0, 4, 1, 2, 3)


def _err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_ti2v_step_matches_diffusers():
    """TI2V as Wan 2.2 5B does it = sora_jax's i2v task without conditioning channels:
    frame 0 given clean, per-frame times 0 there (`conditioning.frame_times`)."""
    params, fields, shapes, report = wan.load_diffusers(GOLDEN / "ti2v")
    assert report.ok and shapes == wan.WanShapes(48, 48, 32) and fields["cond_channels"] == 0
    io = dict(np.load(GOLDEN / "ti2v_io.npz"))
    b, frames = io["timestep_frames"].shape
    given = conditioning.task_mask("i2v", b, frames)
    t_frames = conditioning.frame_times(jnp.asarray(io["timestep"] / 1000), given)
    np.testing.assert_array_equal(t_frames, io["timestep_frames"] / 1000)
    # diffusers' per-token timesteps are the per-frame ones repeated over each frame's tokens
    tokens = io["timestep_tokens"].reshape(b, frames, -1)
    assert (tokens == io["timestep_frames"][:, :, None]).all()
    out = _forward(params, fields, shapes, io["latents"], t_frames, io["text"])
    assert _err(out, io["output"]) <= RTOL, _err(out, io["output"])
    # The per-frame times matter: one t for all frames gives diffusers' other output.
    uniform = _forward(params, fields, shapes, io["latents"], io["timestep"] / 1000, io["text"])
    assert _err(uniform, io["output_uniform_t"]) <= RTOL
    assert _err(uniform, io["output"]) > 100 * RTOL


def test_two_expert_steps_pick_diffusers_expert_and_match():
    """Each step of diffusers' WanPipeline run: the boundary rule picks the expert the
    pipeline ran, and that expert's sora_jax output matches the recorded prediction."""
    io = dict(np.load(GOLDEN / "experts_io.npz"))
    ratio = float(io["boundary_ratio"])
    assert int(io["num_train_timesteps"]) == wan_experts.NUM_TRAIN_TIMESTEPS
    experts = [wan.load_diffusers(GOLDEN / name) for name in ("high", "low")]
    fields, shapes = experts[0][1], experts[0][2]
    t = io["timestep"][:, 0] / 1000  # one time per step, batch of 1
    picked = np.asarray(wan_experts.expert_index(t, ratio))
    np.testing.assert_array_equal(picked, io["expert"])
    assert set(io["expert"].tolist()) == {0, 1}  # steps on both sides of the boundary

    model = dit_lib.VideoDiT(in_channels=16, out_channels=16, text_dim=32, **fields)

    def apply(params, x, tt, text):  # diffusers' layout in and out, traced
        mask = jnp.ones(text.shape[:2], bool)
        v = model.apply({"params": params}, x.transpose(0, 2, 3, 4, 1), tt, text, mask)
        return v.transpose(0, 4, 1, 2, 3)

    for i in range(len(t)):
        args = (io["latents"][i], io["timestep"][i] / 1000, io["text"])
        want = io["output"][i]
        chosen = _forward(experts[picked[i]][0], fields, shapes, *args)
        assert _err(chosen, want) <= RTOL, (i, _err(chosen, want))
        other = _forward(experts[1 - picked[i]][0], fields, shapes, *args)
        assert _err(other, want) > 100 * RTOL  # the wrong expert is visible
    # two_expert_apply runs the expert of t (steps 0 and last: one of each).
    for i in (0, len(t) - 1):
        x, tt = io["latents"][i], io["timestep"][i] / 1000
        got = wan_experts.two_expert_apply(
            apply, experts[0][0], experts[1][0], x, tt, io["text"], boundary_ratio=ratio
        )
        assert _err(np.asarray(got), io["output"][i]) <= RTOL


def test_boundary_rule_and_time_ranges():
    """WanPipeline: `transformer` for timestep >= boundary_ratio · 1000, else `transformer_2`."""
    ratio = wan_experts.BOUNDARY_RATIO_T2V
    t = np.array([1.0, 0.875, 0.87499, 0.5, 0.0])
    np.testing.assert_array_equal(wan_experts.expert_index(t, ratio), [0, 0, 1, 1, 1])
    assert wan_experts.time_range(wan_experts.HIGH, ratio) == (0.875, 1.0)
    assert wan_experts.time_range(wan_experts.LOW, ratio) == (0.0, 0.875)
    u = jnp.linspace(0.0, 0.999, 7)
    for e in (wan_experts.HIGH, wan_experts.LOW):
        picked = wan_experts.expert_index(wan_experts.restrict_time(u, e, ratio), ratio)
        assert (np.asarray(picked) == e).all()
    with pytest.raises(ValueError, match="boundary_ratio"):
        wan_experts.expert_index(t, 1.5)


def _published_vs_preset(doc: dict, preset: str, scan_layers: bool) -> None:
    published = {k: tuple(v) for k, v in doc["tensors"].items()}
    fields, shapes = wan.fields_from_diffusers(doc["config"])
    layers = fields["num_layers"]
    built = dit_lib.model_fields({"preset": preset, "scan_layers": scan_layers})
    assert {k: v for k, v in built.items() if k in fields and v != fields[k]} == {}
    abstract = wan.abstract_params(built, shapes)
    leaves = wan_names.leaf_paths(abstract)
    ours = {}
    for r in wan_names.name_map(layers, True, scan_layers):
        shape = tuple(leaves[r.path].shape)
        ours[r.name] = wan_names.hf_shape(
            r.kind, shape[1:] if scan_layers and r.layer is not None else shape, (1, 2, 2)
        )
    assert sorted(set(published) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if published[k] != v} == {}
    wan_names.check_covered(wan_names.name_map(layers, True, scan_layers), leaves)
    assert sum(int(np.prod(s.shape)) for s in leaves.values()) == doc["num_params"]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_published_tensor_lists_map_onto_the_presets(scan_layers):
    """TI2V-5B (825 tensors, 4,999,787,712 params) and each A14B expert (1095 tensors,
    14,288,491,584 params) <-> the presets' trees (eval_shape): names, shapes, counts."""
    doc = json.loads((GOLDEN / "shapes.json").read_text())
    assert len(doc["ti2v_5b"]["tensors"]) == 825 and doc["ti2v_5b"]["num_params"] == 4_999_787_712
    assert doc["a14b_expert"]["num_params"] == 14_288_491_584
    _published_vs_preset(doc["ti2v_5b"], "wan2_2_ti2v_5b", scan_layers)
    _published_vs_preset(doc["a14b_expert"], "wan2_2_a14b", scan_layers)
    assert doc["a14b_boundary_ratio"] == wan_experts.BOUNDARY_RATIO_T2V
    fields, _ = wan.fields_from_diffusers(doc["ti2v_5b"]["config"])
    assert wan.resolve_model_config(fields, "wan2_2_ti2v_5b")["preset"] == "wan2_2_ti2v_5b"
