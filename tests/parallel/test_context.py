"""Context-parallel attention (ring, Ulysses, all-gather) on 8 fake CPU devices.

Independent references: `jax.nn.dot_product_attention` for attention, the single-device
model for VideoDiT. Everything is float32; values and gradients must agree within
ATOL = RTOL = 1e-5 (attention) and 1e-5 / 1e-4 (the model, whose parameter gradients sum
over every token), far below any error the sharding could introduce (a dropped or doubled
block moves outputs by O(1e-1)).
"""

import functools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sora_jax import config as config_lib
from sora_jax.models import attention, build_model, dit
from sora_jax.parallel import context as context_lib
from sora_jax.parallel.mesh import AXES, DEFAULT_RULES
from sora_jax.run import validate as validate_lib

# XLA's CPU backend optimizations off: about half the compile time, same HLO program.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
ATOL = RTOL = 1e-5
B, N, E = 2, 4, 8
MESHES = {  # (data, fsdp, context, tensor)
    "context2": (1, 1, 2, 1),
    "context4": (1, 1, 4, 1),
    "data2_context2_tensor2": (2, 1, 2, 2),
}


def _mesh(sizes):
    devices = jax.devices()[: math.prod(sizes)]
    return jax.make_mesh(sizes, AXES, (AxisType.Auto,) * 4, devices=devices)


def _qkv(length, s=None, n=N, seed=0):
    """q `[B, L, N, E]`, k/v `[B, S, N, E]` (S = L: self-attention) and a cotangent w.

    NumPy draws: jax.random would compile a kernel for every new shape.
    """
    s = length if s is None else s
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return normal(B, length, n, E), normal(B, s, n, E), normal(B, s, n, E), normal(B, length, n, E)


def _key_mask(s, valid=(None, -5)):
    """Key padding `[B, 1, 1, S]`: sample 0 sees every key, sample 1 all but the last 5."""
    lengths = np.array([s if n is None else s + n for n in valid])
    return jnp.asarray(np.arange(s)[None] < lengths[:, None])[:, None, None, :]


def _attend(q, k, v, mask, strategy, impl="xla"):
    if strategy == "reference":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    return attention.dot_product_attention(q, k, v, mask, impl=impl, context_parallel=strategy)


@functools.partial(jit, static_argnames=("strategy", "impl"))
def _value_and_grads(q, k, v, w, mask, strategy, impl="xla"):
    """`o` of `strategy` (or the 'reference') and the gradients of `sum(o · w)` for q, k, v.

    One jitted function, so each reference shape compiles once for the whole file; the
    mesh in context is part of the cache key, so every mesh gets its own program.
    """

    def loss(q, k, v):
        o = _attend(q, k, v, mask, strategy, impl)
        return jnp.sum(o * w), o

    (_, o), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, grads


def _assert_close(ours, ref, atol=ATOL, rtol=RTOL):
    (o, grads), (o_ref, grads_ref) = ours, ref
    np.testing.assert_allclose(o, o_ref, atol=atol, rtol=rtol)
    for g, g_ref, name in zip(grads, grads_ref, "qkv", strict=True):
        np.testing.assert_allclose(g, g_ref, atol=atol, rtol=rtol, err_msg=f"d loss / d {name}")


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
@pytest.mark.parametrize(
    "tokens, mesh",
    [
        (80, "context2"),  # the demo bucket: 5 latent frames x 8 x 8 latent, patch (1, 2, 2)
        (80, "context4"),
        (144, "context2"),  # 16 x 9
        (144, "context4"),
        (81, "context2"),  # not divisible: padded to 82 / 84 and the padding masked
        (75, "context4"),
        (16, "context2"),  # an image bucket (T' = 1)
        (16, "context4"),
        (80, "data2_context2_tensor2"),
        (75, "data2_context2_tensor2"),
    ],
)
def test_matches_full_attention_values_and_gradients(devices, strategy, tokens, mesh):
    q, k, v, w = _qkv(tokens)
    mask = _key_mask(tokens)
    with jax.set_mesh(_mesh(MESHES[mesh])):
        ours = _value_and_grads(q, k, v, w, mask, strategy)
    _assert_close(ours, _value_and_grads(q, k, v, w, mask, "reference"))


@pytest.mark.parametrize(
    "tokens, mesh",
    [(80, "context2"), (75, "context4"), (16, "context4"), (75, "data2_context2_tensor2")],
)
def test_allgather_matches_full_attention_values_and_gradients(devices, tokens, mesh):
    """All-gather K/V: local queries against the gathered keys, with the memory-efficient
    kernel per device (the dense one is covered by the mask test below)."""
    q, k, v, w = _qkv(tokens, seed=4)
    mask = _key_mask(tokens)
    with jax.set_mesh(_mesh(MESHES[mesh])):
        ours = _value_and_grads(q, k, v, w, mask, "allgather", impl="blockwise")
    _assert_close(ours, _value_and_grads(q, k, v, w, mask, "reference"))


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "allgather"])
def test_no_mask_and_general_mask(devices, strategy):
    """Without a mask (the padding is the only mask) and with a per-head, per-query mask
    `[B, N, L, S]`, on a mesh that splits heads over `tensor` (and, for Ulysses, `context`)."""
    q, k, v, w = _qkv(75, seed=1)
    general = np.random.default_rng(2).random((B, N, 75, 75)) < 0.5
    general = jnp.asarray(general | np.eye(75, dtype=bool))  # every query keeps a key
    for mask in (None, general):
        with jax.set_mesh(_mesh(MESHES["data2_context2_tensor2"])):
            ours = _value_and_grads(q, k, v, w, mask, strategy)
        _assert_close(ours, _value_and_grads(q, k, v, w, mask, "reference"))


def test_cross_attention_splits_only_the_queries(devices):
    """'queries': 75 video queries over context, 7 text keys whole; sample 1 has no valid
    text token (a dropped caption) and must come back as zeros, as without a mesh."""
    q, k, v, w = _qkv(75, s=7, seed=3)
    mask = _key_mask(7, valid=(-3, -7))
    with jax.set_mesh(_mesh(MESHES["data2_context2_tensor2"])):
        ours = _value_and_grads(q, k, v, w, mask, "queries")
    _assert_close(ours, _value_and_grads(q, k, v, w, mask, "none"))
    np.testing.assert_array_equal(ours[0][1], 0.0)
    o_ref, _ = _value_and_grads(q, k, v, w, mask, "reference")
    np.testing.assert_allclose(ours[0][0], o_ref[0], atol=ATOL, rtol=RTOL)


def test_ulysses_runs_the_splash_kernel_per_device(devices):
    """Ulysses hands each device whole sequences, so any kernel runs there: splash (in the
    Pallas interpreter on CPU) with the padding of 81 tokens as its segment ids."""
    q, k, v, w = _qkv(81, seed=4)
    mask = _key_mask(81)
    with jax.set_mesh(_mesh(MESHES["context2"])):
        ours = _value_and_grads(q, k, v, w, mask, "ulysses", impl="splash")
    _assert_close(ours, _value_and_grads(q, k, v, w, mask, "reference"), atol=1e-4)


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
@pytest.mark.parametrize(
    "tokens, mesh, valid",
    [
        (81, "context2", (None, -5)),  # padded to 82
        (80, "context4", (None, -25)),  # sample 1's last ring block has no valid key
        (75, "data2_context2_tensor2", "general"),  # a per-head, per-query mask
    ],
)
def test_blockwise_kernel_per_device(devices, strategy, tokens, mesh, valid):
    """impl='blockwise': Ulysses runs it on whole sequences; ring runs it on each K/V block
    and merges the blocks by their log-sum-exps (a block with no valid key gets weight 0)."""
    q, k, v, w = _qkv(tokens, seed=5)
    if valid == "general":
        mask = np.random.default_rng(6).random((B, N, tokens, tokens)) < 0.5
        mask = jnp.asarray(mask | np.eye(tokens, dtype=bool))
    else:
        mask = _key_mask(tokens, valid)
    with jax.set_mesh(_mesh(MESHES[mesh])):
        ours = _value_and_grads(q, k, v, w, mask, strategy, impl="blockwise")
    _assert_close(ours, _value_and_grads(q, k, v, w, mask, "reference"))


def test_cross_attention_with_the_blockwise_kernel(devices):
    q, k, v, w = _qkv(75, s=7, seed=7)
    mask = _key_mask(7, valid=(-3, -7))  # sample 1: no valid text token
    with jax.set_mesh(_mesh(MESHES["data2_context2_tensor2"])):
        ours = _value_and_grads(q, k, v, w, mask, "queries", impl="blockwise")
    _assert_close(ours, _value_and_grads(q, k, v, w, mask, "none"))
    np.testing.assert_array_equal(ours[0][1], 0.0)


def test_without_context_axis_is_the_plain_kernel(devices):
    q, k, v, _ = _qkv(16)
    plain = attention.dot_product_attention(q, k, v, impl="xla")
    for strategy in context_lib.STRATEGIES:
        ours = attention.dot_product_attention(q, k, v, context_parallel=strategy)
        np.testing.assert_array_equal(ours, plain)  # no mesh: exactly the same computation
    with jax.set_mesh(_mesh((8, 1, 1, 1))):  # a mesh whose context axis has size 1
        ours = jit(functools.partial(_attend, strategy="ring"))(q, k, v, None)
    np.testing.assert_allclose(ours, plain, atol=ATOL)
    with pytest.raises(ValueError, match="context_parallel='flash'.*choose one of"):
        attention.dot_product_attention(q, k, v, context_parallel="flash")
    with pytest.raises(ValueError, match="self-attention.*'queries'"):
        attention.dot_product_attention(q, k[:, :7], v[:, :7], context_parallel="ring")


def test_ulysses_refuses_heads_it_cannot_split(devices):
    q, k, v, _ = _qkv(16, n=2)
    with jax.set_mesh(_mesh(MESHES["context4"])):
        with pytest.raises(ValueError, match=r"2 heads.*context=4.*'ring'"):
            jax.eval_shape(functools.partial(_attend, strategy="ulysses"), q, k, v, None)


def _collectives(hlo: str) -> dict[str, list[str]]:
    """HLO instruction lines per collective kind (async '-start' forms included)."""
    kinds = ("all-gather", "all-to-all", "collective-permute", "all-reduce")
    found = {kind: [] for kind in kinds}
    for line in hlo.splitlines():
        for kind in kinds:
            if re.search(rf"\b{kind}(-start)?\(", line):
                found[kind].append(line)
    return found


def test_compiled_collectives(devices):
    """Forward and backward of a step: ring passes K/V blocks with collective-permutes and
    never gathers them; Ulysses uses all-to-alls. The 'none' baseline (the compiler's own
    partitioning of sequence-sharded attention) does all-gather K/V, so the check can fail."""
    n = 8  # two tensor shards of four heads, split over four context devices by Ulysses
    mesh = _mesh((1, 1, 4, 2))
    spec = NamedSharding(mesh, P(None, "context", "tensor", None))
    x = jax.ShapeDtypeStruct((B, 80, n, E), jnp.float32, sharding=spec)
    hlo = {}
    for strategy in ("ring", "ulysses", "allgather", "none"):
        loss = lambda q, k, v, s=strategy: jnp.sum(jnp.sin(_attend(q, k, v, None, s)))
        with jax.set_mesh(mesh):
            compiled = jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
        hlo[strategy] = _collectives(compiled.as_text())
    # Forward: one permute each for k and v per step but the last (3); backward mirrors it.
    assert len(hlo["ring"]["collective-permute"]) >= 2 * 3
    assert not hlo["ring"]["all-gather"] and not hlo["ring"]["all-to-all"]
    assert len(hlo["ulysses"]["all-to-all"]) >= 4  # q, k, v in and o out, forward
    assert not hlo["ulysses"]["all-gather"]
    # All-gather: K and V gathered whole (this device's heads) forward; nothing else moves.
    assert any("f32[2,80,4," in line for line in hlo["allgather"]["all-gather"])
    assert not hlo["allgather"]["all-to-all"] and not hlo["allgather"]["collective-permute"]
    assert any("f32[2,80," in line for line in hlo["none"]["all-gather"])  # full K/V


# --- The model -------------------------------------------------------------------------

C, D_TEXT = 4, 8
SMALL = dict(
    name="video_dit", preset="tiny", num_layers=1, dim=32, num_heads=4, mlp_dim=64, freq_dim=32
)


def _model_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6, C))  # 3 x 3 x 3 = 27 tokens: padded on 2 and 4
    t = rng.uniform(size=(2,))
    text = rng.standard_normal((2, 5, D_TEXT))
    text_mask = np.arange(5)[None] < np.array([[5], [2]])
    return tuple(jnp.asarray(a, jnp.float32) for a in (x, t, text)) + (jnp.asarray(text_mask),)


def _model_loss(model, args):
    w = jnp.asarray(np.random.default_rng(9).standard_normal(args[0].shape), jnp.float32)

    def loss(params):
        v = model.apply({"params": params}, *args)
        return jnp.sum(v * w), v

    return jax.value_and_grad(loss, has_aux=True)


@pytest.fixture(scope="module")
def single_device():
    model = build_model(SMALL, C, D_TEXT)
    args = _model_inputs()
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32), abstract
    )
    (_, v), grads = jit(_model_loss(model, args))(params)
    return args, params, v, grads


@pytest.mark.parametrize(
    "strategy, sizes, collective, scan, impl",
    [
        ("ring", (2, 1, 2, 2), "collective-permute", False, "xla"),
        # Stacked blocks under nn.scan with full remat: shard_map inside scan and checkpoint.
        ("ulysses", (1, 2, 4, 1), "all-to-all", True, "xla"),
        # The blockwise kernel per ring block, merged by log-sum-exp, inside scan and remat.
        ("ring", (1, 1, 4, 1), "collective-permute", True, "blockwise"),
        # All-gather K/V with the blockwise kernel, batch and heads sharded too.
        ("allgather", (2, 1, 2, 2), "all-gather", False, "blockwise"),
    ],
)
def test_video_dit_matches_single_device(
    devices, single_device, strategy, sizes, collective, scan, impl
):
    """Output and parameter gradients of the sharded model with context parallelism (27
    tokens: padded) equal the single-device model's (dense 'xla' kernel); the compiled
    program really has the strategy's collectives."""
    args, params, v_ref, grads_ref = single_device
    fields = dict(context_parallel=strategy, scan_layers=scan, remat="full" if scan else "none")
    fields["attention_impl"] = impl
    model = build_model({**SMALL, **fields}, C, D_TEXT)
    if scan:
        params = dit.stack_layers(params, SMALL["num_layers"])
    mesh = _mesh(sizes)
    boxed = jax.eval_shape(model.init, jax.random.key(0), *args)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, DEFAULT_RULES)
        sharded = jax.device_put(params, shardings["params"])
        compiled = jit(_model_loss(model, args)).lower(sharded).compile()
        (_, v), grads = compiled(sharded)
    assert _collectives(compiled.as_text())[collective]  # the strategy really ran
    np.testing.assert_allclose(v, v_ref, atol=1e-5, rtol=1e-4)
    if scan:
        grads = dit.unstack_layers(grads)
    flat, flat_ref = jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_ref)
    for (path, g), g_ref in zip(flat, flat_ref, strict=True):
        np.testing.assert_allclose(
            g, g_ref, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path)
        )


# --- Config validation -----------------------------------------------------------------

DEMO = f"{pathlib.Path(__file__).resolve().parents[2] / 'experiments' / 'demo.py'}:tiny"


def _config(strategy, buckets=None, **mesh):
    config = config_lib.load_config(DEMO)
    with config.unlocked():
        config.model.context_parallel = strategy
        config.mesh.update({**dict(ici_data=-1, ici_fsdp=1, ici_context=1, ici_tensor=1), **mesh})
        if buckets:
            config.data.buckets = ml_collections.ConfigDict(
                {name: dict(frames=f, height=h, width=h, weight=1.0) for name, (f, h) in buckets}
            )
    return config


def test_validation_accepts_padded_token_counts(devices):
    # 80 tokens (the demo bucket) over 8 context devices; 81 tokens (36 px: 18 latent, 9
    # patches per side) over 4 devices with Ulysses: padded, so valid.
    validate_lib.validate(_config("ring", ici_data=1, ici_context=8))
    validate_lib.validate(_config("ulysses", buckets=[("1x36x36", (1, 36))], ici_context=4))


def test_validation_names_heads_bucket_and_fix(devices):
    config = _config("ulysses", buckets=[("1x4x4", (1, 4))], ici_data=1, ici_context=4)
    with config.unlocked():
        config.mesh.ici_tensor = 2  # 4 heads / 2 = 2 per tensor shard, over 4 context devices
    with pytest.raises(config_lib.ConfigError) as e:
        validate_lib.validate(config)
    text = str(e.value)
    assert "model.context_parallel='ulysses'" in text and "model.num_heads=4" in text
    assert "context=4" in text and "'ring'" in text and "'allgather'" in text  # the fixes
    # 1 latent token (4 px -> 2 latent -> 1 patch) cannot fill 4 context devices.
    assert "data.buckets.1x4x4: 1 video tokens" in text and "at most 1" in text
    # Ring has no head constraint; the bucket is still too small.
    with pytest.raises(config_lib.ConfigError, match=r"data\.buckets\.1x4x4") as e:
        validate_lib.validate(_config("ring", buckets=[("1x4x4", (1, 4))], ici_context=4))
    assert "num_heads" not in str(e.value)
    # Nor has all-gather.
    validate_lib.validate(_config("allgather", ici_data=1, ici_context=8))


def test_validation_rejects_unknown_strategy(devices):
    with pytest.raises(config_lib.ConfigError, match=r"model\.context_parallel='rings'.*ulysses"):
        validate_lib.validate(_config("rings", ici_context=2))
