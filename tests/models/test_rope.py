"""3D RoPE: attention scores depend on positions only through their difference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import rope


def _scores(q, k, grid, split, q_offset, k_offset):
    """Scores `[B, N, L, S]` with q at grid positions + q_offset and k at + k_offset."""
    q = rope.apply_rope(q, *rope.rope_tables(grid, split, q_offset))
    k = rope.apply_rope(k, *rope.rope_tables(grid, split, k_offset))
    return jnp.einsum("BLNE,BSNE->BNLS", q, k)


@pytest.mark.parametrize("grid", [(3, 4, 5), (1, 6, 2)])
def test_scores_are_translation_equivariant(grid):
    e, split = 16, rope.default_split(16)
    length = int(np.prod(grid))
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (1, length, 2, e))
    k = jax.random.normal(kk, (1, length, 2, e))
    base = _scores(q, k, grid, split, (0, 0, 0), (0, 0, 0))
    shift = (7, 3, 11)
    np.testing.assert_allclose(_scores(q, k, grid, split, shift, shift), base, atol=2e-4, rtol=1e-4)
    # Not vacuous: RoPE changes the scores, and so does a shift of k alone along any axis.
    assert not np.allclose(base, jnp.einsum("BLNE,BSNE->BNLS", q, k), atol=1e-2)
    for axis in range(3):
        only_k = tuple(int(a == axis) for a in range(3))
        assert not np.allclose(_scores(q, k, grid, split, (0, 0, 0), only_k), base, atol=1e-2)


def test_rotation_preserves_norm_and_position_zero_is_identity():
    x = jax.random.normal(jax.random.key(2), (2, 24, 3, 12))
    cos, sin = rope.rope_tables((2, 3, 4), rope.default_split(12))
    y = rope.apply_rope(x, cos, sin)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)  # token (0, 0, 0): no rotation


def test_splits():
    assert rope.default_split(128) == (44, 42, 42)  # Wan2.1's split of head dim 128
    assert rope.default_split(16) == (8, 4, 4)
    with pytest.raises(ValueError, match="rope_split"):
        rope.check_split((6, 5, 5), 16)
    with pytest.raises(ValueError, match="rope_split"):
        rope.check_split((8, 4, 2), 16)


def test_sincos_embedding_is_absolute_and_factorized():
    grid = (3, 4, 5)
    emb = np.asarray(rope.sincos_embedding(grid, 48))
    assert emb.shape == (60, 48)
    # Every token gets a distinct embedding (absolute positions are recoverable).
    distances = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    assert distances[~np.eye(60, dtype=bool)].min() > 1e-3
    # The time part depends on the frame only: equal within a frame, different across.
    d_t = rope.default_split(48)[0]
    per_frame = emb.reshape(3, 20, 48)[..., :d_t]
    np.testing.assert_allclose(per_frame, np.broadcast_to(per_frame[:, :1], per_frame.shape))
    assert not np.allclose(per_frame[0, 0], per_frame[1, 0])
    # Position 0 along every axis: sin 0 = 0, cos 0 = 1.
    np.testing.assert_allclose(np.abs(emb[0]).sum(), 48 / 2, rtol=1e-6)
