"""VideoDiT: shapes over buckets, patches, zero init, text masking, logical names, factory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sora_jax.models import PRESETS, VideoDiT, build_model, dit

C, D_TEXT, S = 4, 16, 6
# XLA's CPU backend optimizations off: about half the compile time, same HLO program.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def tiny(**overrides) -> VideoDiT:
    return build_model(dict(name="video_dit", preset="tiny", **overrides), C, D_TEXT)


def inputs(key, b=2, shape=(3, 8, 6), per_frame=False, channels=C):
    kx, kt, ks = jax.random.split(key, 3)
    x = jax.random.normal(kx, (b, *shape, channels))
    t = jax.random.uniform(kt, (b, shape[0]) if per_frame else (b,))
    text = jax.random.normal(ks, (b, S, D_TEXT))
    mask = jnp.arange(S)[None] < jnp.array([S, 3])[:b, None]  # sample 1: 3 valid tokens
    return x, t, text, mask


def init(model, args, key=0):
    """The model's real initial parameters, unboxed."""
    return nn.meta.unbox(jit(model.init)(jax.random.key(key), *args)["params"])


def random_params(model, args, seed=1, scale=0.1):
    """Gaussian noise in every parameter (no init compile), so no branch is trivially 0."""
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), abstract
    )


@pytest.mark.parametrize(
    "shape,patch,per_frame",
    [
        ((1, 8, 8), (1, 2, 2), False),  # an image
        ((3, 8, 6), (1, 2, 2), True),  # non-square, per-frame t
        ((4, 4, 12), (2, 2, 2), True),  # temporal patch: per-frame t averaged per patch
        ((2, 6, 4), (1, 1, 2), False),
    ],
)
def test_output_shape_dtype_and_finite(shape, patch, per_frame):
    model = tiny(patch_size=patch)
    args = inputs(jax.random.key(0), shape=shape, per_frame=per_frame)
    params = random_params(model, args)
    v = jit(model.apply)({"params": params}, *args)
    assert v.shape == (2, *shape, C) and v.dtype == jnp.float32
    assert np.all(np.isfinite(v)) and np.abs(v).max() > 0


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 1), (2, 4, 2)])
def test_patchify_unpatchify_identity(patch):
    x = jax.random.normal(jax.random.key(0), (2, 4, 8, 12, 3))
    tokens, grid = dit.patchify(x, patch)
    assert tokens.shape == (2, np.prod(grid), np.prod(patch) * 3)
    np.testing.assert_array_equal(dit.unpatchify(tokens, grid, patch), x)
    # Token 0 holds exactly the first spacetime patch, in (pt, ph, pw, C) order.
    pt, ph, pw = patch
    np.testing.assert_array_equal(tokens[:, 0], x[:, :pt, :ph, :pw].reshape(2, -1))


def test_indivisible_shape_names_shape_and_patch():
    model = tiny(patch_size=(1, 2, 2))
    args = inputs(jax.random.key(0), shape=(3, 7, 6))
    with pytest.raises(ValueError, match=r"\(3, 7, 6\).*patch_size=\(1, 2, 2\)"):
        jax.eval_shape(model.init, jax.random.key(0), *args)


@pytest.mark.parametrize(
    "per_frame, pos_embed, pooled_text", [(False, "none", False), (True, "sincos", True)]
)
def test_initial_output_is_exactly_zero(per_frame, pos_embed, pooled_text):
    model = tiny(pos_embed=pos_embed, pooled_text=pooled_text)
    args = inputs(jax.random.key(0), per_frame=per_frame)
    params = init(model, args)
    np.testing.assert_array_equal(jit(model.apply)({"params": params}, *args), 0.0)


@pytest.mark.parametrize("pooled_text", [False, True])
def test_masked_text_is_ignored(pooled_text):
    model = tiny(pooled_text=pooled_text)
    x, t, text, mask = inputs(jax.random.key(0))
    params = random_params(model, (x, t, text, mask))
    apply = jit(model.apply)
    v = apply({"params": params}, x, t, text, mask)
    garbage = jax.random.normal(jax.random.key(5), text.shape) * 10
    text2 = jnp.where(mask[..., None], text, garbage)  # only masked-out tokens change
    np.testing.assert_allclose(apply({"params": params}, x, t, text2, mask), v, atol=1e-6)
    # Not vacuous: changing a valid token does change the output.
    v3 = apply({"params": params}, x, t, text.at[:, 0].add(1.0), mask)
    assert np.abs(v3 - v).max() > 1e-4
    # A caption with no valid token (the null conditioning) still gives a finite output.
    v0 = apply({"params": params}, x, t, text * 0, jnp.zeros_like(mask))
    assert np.all(np.isfinite(v0))


def test_sincos_positions_break_frame_permutation_symmetry():
    """`pos_embed='sincos'` adds absolute positions (the same parameters give another
    output than RoPE alone), and an unknown value is refused when the model is built."""
    x, t, text, mask = inputs(jax.random.key(0))
    plain, absolute = tiny(), tiny(pos_embed="sincos")
    params = random_params(plain, (x, t, text, mask))
    v_plain = jit(plain.apply)({"params": params}, x, t, text, mask)
    v_abs = jit(absolute.apply)({"params": params}, x, t, text, mask)
    assert np.abs(v_abs - v_plain).max() > 1e-4  # same parameters, the embedding is used
    with pytest.raises(ValueError, match="pos_embed"):
        build_model(dict(name="video_dit", preset="tiny", pos_embed="learned"), C, D_TEXT)


def test_per_frame_times_equal_to_scalar_time_match():
    model = tiny()
    x, t, text, mask = inputs(jax.random.key(0))
    params = random_params(model, (x, t, text, mask))
    t_frames = jnp.repeat(t[:, None], x.shape[1], axis=1)  # [B] -> [B, T]
    apply = jit(model.apply)
    v = apply({"params": params}, x, t, text, mask)
    v_frames = apply({"params": params}, x, t_frames, text, mask)
    np.testing.assert_allclose(v_frames, v, atol=1e-5)
    v_diff = apply({"params": params}, x, t_frames.at[:, 0].set(0.9), text, mask)
    assert np.abs(v_diff - v).max() > 1e-4  # frames really get their own time


@pytest.mark.parametrize("overrides", [{}, {"mlp": "swiglu"}])
def test_every_param_has_logical_names(overrides):
    model = tiny(**overrides)
    boxed = jax.eval_shape(model.init, jax.random.key(0), *inputs(jax.random.key(0)))["params"]
    leaves = jax.tree.leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) > 20
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, (
            f"{name}: names {leaf.names} vs {leaf.value.shape}"
        )
        assert any(n is not None for n in leaf.names), f"{name} has only None names"


def test_build_model_presets_overrides_and_errors():
    model = build_model(
        {"name": "video_dit", "preset": "B", "num_layers": 3, "dtype": "bfloat16"}, 16, 32
    )
    assert (model.dim, model.num_layers, model.num_heads) == (768, 3, 12)
    assert model.dtype == jnp.bfloat16 and model.in_channels == model.out_channels == 16
    assert build_model({"name": "video_dit", "preset": "S", "dim": None}, 4, 8).dim == 384
    assert set(PRESETS) >= {"tiny", "S", "B", "L", "XL"}
    with pytest.raises(ValueError, match="tiny"):
        build_model({"name": "video_dit", "preset": "huge"}, 4, 8)
    with pytest.raises(ValueError, match="num_heads"):
        build_model({"name": "video_dit", "num_head": 3}, 4, 8)
    with pytest.raises(ValueError, match="video_dit"):
        build_model({"name": "unet"}, 4, 8)


def test_sharded_apply_matches_single_device(devices):
    """With logical rules and an 8-device mesh, the model computes what one device does."""
    from jax.sharding import AxisType

    from sora_jax.parallel.mesh import DEFAULT_RULES

    model = tiny(scan_layers=True)
    args = inputs(jax.random.key(0), b=4, shape=(2, 8, 8))
    args = (*args[:3], jnp.ones((4, S), bool).at[1, 3:].set(False))
    params = random_params(model, args)
    expected = jit(model.apply)({"params": params}, *args)
    mesh = jax.make_mesh((2, 2, 1, 2), ("data", "fsdp", "context", "tensor"), (AxisType.Auto,) * 4)
    boxed = jax.eval_shape(model.init, jax.random.key(0), *args)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, DEFAULT_RULES)
        sharded = jax.device_put(params, shardings["params"])
        out = jit(model.apply)({"params": sharded}, *args)
    assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8
    np.testing.assert_allclose(out, expected, atol=1e-5)
