"""The DiT on packed rows: every clip of a row gets the velocity (and gradient) it gets alone.

A row holds clips of different shapes (landscape, portrait, an image), per-frame times, an
i2v-conditioned clip (frame 0 given through t = 0 and the conditioning channels) and a
dropped caption; a second row holds one clip and padding. Each clip's token velocities
must equal `patchify` of the clip's velocity run alone through the bucketed call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import conditioning
from sora_jax.models import attention as attention_lib
from sora_jax.models import dit

C, S, D_TEXT, PATCH = 4, 5, 8, (1, 2, 2)
# Float32 on CPU: the packed row sums softmax terms and matmuls in another order and over
# other padding; measured differences are ~1e-6 relative.
TOL = dict(rtol=2e-5, atol=2e-5)
# (latent [T', H', W'], text tokens kept, task) per clip; rows of L = 40 tokens.
ROWS = [
    [((3, 4, 6), 3, "i2v"), ((2, 6, 4), 5, "t2v"), ((1, 4, 4), 2, "t2v")],  # 18 + 12 + 4
    [((2, 4, 4), 0, "t2v")],  # 8 tokens, a dropped caption, 32 padding tokens
]
L = 40


def _model(impl: str, **kw) -> dit.VideoDiT:
    return dit.VideoDiT(
        in_channels=2 * C + 1, out_channels=C, patch_size=PATCH, dim=32, num_layers=2,
        num_heads=2, mlp_dim=64, text_dim=D_TEXT, attention_impl=impl, cond_channels=C + 1,
        **kw,
    )  # fmt: skip


def _clips(seed: int = 0):
    """Per clip: model input x_in [T', H', W', 2C+1], per-frame t [T'], text, mask, target."""
    rng = np.random.default_rng(seed)
    out = []
    for row in ROWS:
        clips = []
        for shape, kept, task in row:
            x0 = rng.normal(size=(*shape, C)).astype(np.float32)
            eps = rng.normal(size=(*shape, C)).astype(np.float32)
            t = rng.uniform(0.05, 0.95, size=shape[0]).astype(np.float32)  # per frame
            given = None
            if task == "i2v":
                given = conditioning.task_mask("i2v", 1, shape[0])  # [1, T']
                t = np.asarray(conditioning.frame_times(jnp.asarray(t[:1]).max()[None], given))[0]
            tt = t.reshape(-1, 1, 1, 1)
            x_t = (1 - tt) * x0 + tt * eps
            x_in = conditioning.model_input(
                jnp.asarray(x_t)[None], jnp.asarray(x0)[None], given, C + 1
            )
            text = rng.normal(size=(S, D_TEXT)).astype(np.float32)
            mask = np.arange(S) < kept
            text = text * mask[:, None]
            clips.append(dict(x_in=np.asarray(x_in[0]), t=t, text=text, mask=mask, target=eps - x0))
        out.append(clips)
    return out


def _pack(rows):
    """Packed arrays of the rows: tokens, per-token t, segment ids, positions, text."""
    b, k = len(rows), max(len(r) for r in rows)
    feat = np.prod(PATCH) * (2 * C + 1)
    tokens = np.zeros((b, L, feat), np.float32)
    t = np.zeros((b, L), np.float32)
    seg = np.zeros((b, L), np.int32)
    pos = np.zeros((b, L, 3), np.int32)
    text = np.zeros((b, k * S, D_TEXT), np.float32)
    mask = np.zeros((b, k * S), bool)
    text_seg = np.zeros((b, k * S), np.int32)
    spans = []
    for r, clips in enumerate(rows):
        cursor, row_spans = 0, []
        for j, clip in enumerate(clips):
            x, grid = dit.patchify(jnp.asarray(clip["x_in"])[None], PATCH)
            n = x.shape[1]
            sl = slice(cursor, cursor + n)
            tokens[r, sl] = x[0]
            seg[r, sl] = j + 1
            p = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"), -1)
            pos[r, sl] = p.reshape(-1, 3)
            t[r, sl] = clip["t"][pos[r, sl, 0]]  # pt = 1: a token's time is its frame's
            text[r, j * S : (j + 1) * S] = clip["text"]
            mask[r, j * S : (j + 1) * S] = clip["mask"]
            text_seg[r, j * S : (j + 1) * S] = j + 1
            row_spans.append(sl)
            cursor += n
        spans.append(row_spans)
    packed = dict(segment_ids=seg, positions=pos, text_segment_ids=text_seg)
    return tokens, t, text, mask, packed, spans


def _params(model, seed: int = 1):
    """Random parameters everywhere (adaLN-Zero's zero init would make every output 0)."""
    clip = _clips()[0][0]

    @jax.jit  # one compile, not one per operation of the model's init
    def params(x_in, t, text, mask):
        init = model.init(jax.random.key(0), x_in, t, text, mask)["params"]
        leaves, tree = jax.tree.flatten(init)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        return jax.tree.unflatten(
            tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        )

    return params(clip["x_in"][None], clip["t"][None], clip["text"][None], clip["mask"][None])


def _jit_apply(model):
    return jax.jit(lambda p, *a, **kw: model.apply({"params": p}, *a, **kw))


def _alone(model, params, clip):
    """The clip alone through the bucketed call, as tokens [n, P·C]."""
    x_in, t, text, mask = (clip[k][None] for k in ("x_in", "t", "text", "mask"))
    v = _jit_apply(model)(params, x_in, t, text, mask)
    return dit.patchify(v, PATCH)[0][0]


@pytest.mark.parametrize("impl", ["xla", "blockwise", "splash"])
def test_packed_row_gives_each_clip_its_velocity_and_gradient_alone(impl):
    """Velocities: each clip's tokens equal the clip run alone. Gradients: d/dθ Σ_k l_k of
    the packed row = Σ_k d/dθ l_k(clip k alone), l_k the clip's mean squared velocity
    error, so a clip's gradient contribution does not depend on its row-mates."""
    model = _model(impl, scan_layers=True)  # the scanned stack: one block compiled
    params = _params(model)
    rows = _clips()
    tokens, t, text, mask, packed, spans = _pack(rows)
    targets = [
        [dit.patchify(jnp.asarray(c["target"])[None], PATCH)[0][0] for c in clips] for clips in rows
    ]

    def packed_loss(p, tokens):
        v = model.apply({"params": p}, tokens, t, text, mask, **packed)
        total = 0.0
        for r in range(len(rows)):
            for target, sl in zip(targets[r], spans[r], strict=True):
                total += jnp.mean(jnp.square(v[r, sl] - target))
        return total, v

    def alone_loss(p, clip, target):
        v = _alone(model, p, clip)
        return jnp.mean(jnp.square(v - target)), v

    packed_fn = jax.jit(jax.grad(packed_loss, has_aux=True))
    g_packed, v = packed_fn(params, tokens)
    assert v.shape == (len(rows), L, np.prod(PATCH) * C)
    assert np.all(np.isfinite(v))
    # The row's distinct times [B, M] and a slot per token (time_ids): the same velocities.
    slots = [np.unique(row, return_inverse=True) for row in t]
    m = max(len(u) for u, _ in slots)
    t_slots = np.stack([np.pad(u, (0, m - len(u))) for u, _ in slots])
    time_ids = np.stack([inv.reshape(-1) for _, inv in slots]).astype(np.int32)
    assert m < L // 4  # a few slots per row: the time MLP runs on them, not on L tokens
    v_slots = _jit_apply(model)(params, tokens, t_slots, text, mask, **packed, time_ids=time_ids)
    np.testing.assert_allclose(v_slots, v, **TOL)
    g_alone = []
    for r, clips in enumerate(rows):
        for clip, target, sl in zip(clips, targets[r], spans[r], strict=True):
            g, alone = jax.jit(jax.grad(alone_loss, has_aux=True))(params, clip, target)
            assert float(jnp.max(jnp.abs(alone))) > 0.1  # a real signal, not zeros
            np.testing.assert_allclose(v[r, sl], alone, **TOL)
            g_alone.append(g)
    g_sum = jax.tree.map(lambda *g: sum(g), *g_alone)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_sum))
    assert scale > 1e-2
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_sum), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)

    # Clips really interact with nothing else: a perturbed neighbour leaves clip 0 unchanged.
    tokens2 = tokens.copy()
    tokens2[0, spans[0][1]] += 1.0
    _, v2 = packed_fn(params, tokens2)
    np.testing.assert_allclose(v2[0, spans[0][0]], v[0, spans[0][0]], **TOL)
    assert float(jnp.max(jnp.abs(v2[0, spans[0][1]] - v[0, spans[0][1]]))) > 1e-3


def test_packed_call_refuses_cudnn_and_pooled_text_and_bad_shapes():
    rows = _clips()
    tokens, t, text, mask, packed, _ = _pack(rows)
    with pytest.raises(ValueError, match="model.attention_impl='cudnn'"):
        attention_lib.segment_ids_check("cudnn", "none")
    model = _model("xla", pooled_text=True)
    with pytest.raises(ValueError, match="model.pooled_text"):
        model.init(jax.random.key(0), tokens, t, text, mask, **packed)
    with pytest.raises(ValueError, match="positions has shape"):
        _model("xla").init(
            jax.random.key(0),
            tokens,
            t,
            text,
            mask,
            **{**packed, "positions": packed["positions"][:, :4]},
        )
