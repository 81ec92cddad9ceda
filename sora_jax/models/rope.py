"""3D rotary position embeddings over the (t, h, w) grid of spacetime patches.

The head dimension E is split into three even parts `(E_t, E_h, E_w)`; part `a` rotates
pairs of channels by angles `p_a · omega_{a,j}`, with `p_a` the token's grid position along
axis `a` and `omega_{a,j} = theta^(-2j / E_a)`, `j = 0 .. E_a/2 - 1`. Channel pairs are
adjacent (`2j, 2j+1`), as in Wan2.1's complex-valued RoPE, so imported weights line up.

Because a rotation by `p·omega` followed by the inverse rotation of `p'·omega` is a
rotation by `(p - p')·omega`, the score `q_p · k_p'` depends on positions only through
`p - p'`: attention is translation-equivariant in time, height and width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

THETA = 10_000.0


def default_split(head_dim: int) -> tuple[int, int, int]:
    """Wan2.1's split: `E_h = E_w = 2 (E // 6)`, the rest to time (128 -> (44, 42, 42))."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def check_split(split, head_dim: int) -> tuple[int, int, int]:
    """Validates a `(E_t, E_h, E_w)` split of the head dimension (None = the default)."""
    if split is None:
        split = default_split(head_dim)
    split = tuple(int(s) for s in split)
    if len(split) != 3 or sum(split) != head_dim or any(s < 0 or s % 2 for s in split):
        raise ValueError(
            f"rope_split={split} must be three even, non-negative numbers summing to the head "
            f"dim {head_dim} (e.g. {default_split(head_dim)}); dim / num_heads must be even"
        )
    return split


def grid_positions(grid: tuple[int, int, int], offset=(0, 0, 0)) -> jax.Array:
    """Integer positions `[L, 3]` of a `(T, H, W)` token grid, in token (row-major) order."""
    axes = [np.arange(n) + o for n, o in zip(grid, offset, strict=True)]
    pos = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # [T, H, W, 3]
    return jnp.asarray(pos.reshape(-1, 3), jnp.float32)  # [L, 3], L = T H W


def rope_angles(positions: jax.Array, split, theta: float = THETA) -> jax.Array:
    """Rotation angles `[..., L, E/2]` (float32) for positions `[..., L, 3]` and a split of E
    (`[L, 3]` for one grid; `[B, L, 3]` for packed rows, each token's place in its own clip)."""
    parts = []
    for a, e_a in enumerate(split):
        omega = 1.0 / theta ** (jnp.arange(0, e_a, 2, dtype=jnp.float32) / e_a)  # [E_a/2]
        parts.append(positions[..., a : a + 1].astype(jnp.float32) * omega)
    return jnp.concatenate(parts, axis=-1)


def rope_tables(grid: tuple[int, int, int], split, offset=(0, 0, 0)) -> tuple:
    """`(cos, sin)`, each `[L, E/2]` float32, for the tokens of a `(T, H, W)` grid."""
    angles = rope_angles(grid_positions(grid, offset), split)
    return jnp.cos(angles), jnp.sin(angles)


def position_tables(positions: jax.Array, split) -> tuple:
    """`(cos, sin)`, each `[B, L, E/2]` float32, for per-token positions `[B, L, 3]`: packed
    rows, whose positions restart at (0, 0, 0) in every clip, so each clip's tokens get the
    angles `rope_tables` gives the clip alone."""
    angles = rope_angles(positions, split)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent channel pairs of x `[B, L, N, E]` by the `[L, E/2]` tables (or
    per-row `[B, L, E/2]` tables, `position_tables`).

    `(x_{2j}, x_{2j+1}) -> (x_{2j} cos - x_{2j+1} sin, x_{2j} sin + x_{2j+1} cos)`, computed in
    float32 and returned in x's dtype.
    """
    x32 = x.astype(jnp.float32)
    x_even, x_odd = x32[..., 0::2], x32[..., 1::2]  # [B, L, N, E/2] each
    cos, sin = cos[..., None, :], sin[..., None, :]  # [(B,) L, 1, E/2]: broadcast over heads
    out = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)  # [B, L, N, E/2, 2] -> [B, L, N, E]


def sincos_embedding(grid: tuple[int, int, int], dim: int) -> jax.Array:
    """Fixed absolute 3D sin-cos position embedding `[L, D]` (DiT, Latte), optional.

    RoPE makes attention depend on relative positions only, so a token learns which frame
    it is in only through its neighbours. Adding this embedding after the patch embedding
    gives every token its absolute (t, h, w). The width D is split like `default_split`: `D_h =
    D_w = 2 (D // 6)` channels, the rest to time; each part is `[sin(p w_j), cos(p w_j)]`
    with `w_j = THETA^(-j / (D_a / 2))`.
    """
    return sincos_from_positions(grid_positions(grid), dim)  # [L, D]


def sincos_from_positions(positions: jax.Array, dim: int) -> jax.Array:
    """`sincos_embedding` of positions `[..., L, 3]` -> `[..., L, D]` (packed rows: each
    token's place in its own clip)."""
    split = default_split(dim)
    parts = []
    for axis, d in enumerate(split):
        omega = THETA ** (-np.arange(d // 2) / max(d // 2, 1))  # [D_a / 2]
        angle = positions[..., axis : axis + 1].astype(np.float32) * omega  # [..., L, D_a/2]
        parts += [jnp.sin(angle), jnp.cos(angle)]
    return jnp.concatenate(parts, axis=-1).astype(jnp.float32)  # [..., L, D]
