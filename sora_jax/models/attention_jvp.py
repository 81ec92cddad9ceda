r"""Forward-mode derivatives (`jax.jvp`) through the fused attention kernels.

The fused kernels ('splash': Pallas, 'cudnn': `jax.nn.dot_product_attention`) are
`jax.custom_vjp` functions: reverse mode only, and `jax.jvp` through them fails. Consistency
distillation (sora_jax/diffusion/consistency.py) needs the tangent of the network along
(v, 1), so `with_blockwise_jvp(kernel)` wraps a kernel in a `jax.custom_jvp` whose rule is

    primal  o  = kernel(q, k, v, mask)                          the fused kernel itself
    tangent do = d/dε blockwise(q + ε dq, k + ε dk, v + ε dv, mask) at ε = 0

computed by the blockwise kernel's own JVP rule (models/blockwise_attention.py): linear in
(dq, dk, dv), blocked like its forward (memory linear in L), from the softmax statistics of
its own forward pass. So a JVP costs the fused forward plus the blockwise forward and
tangent; the primal is bitwise the fused kernel's, and the tangent equals the exact
derivative of attention to float32 rounding (tests/models/test_attention_jvp.py checks both
kernels against `jax.jvp` of the dense reference, with key padding and segment ids).

**Only on the forward-mode path.** A `custom_jvp` changes how `jax.grad` differentiates the
function: grad would transpose the blockwise tangent instead of running the fused kernel's
own backward. So the wrapper is applied only inside `forward_mode()`, a trace-time context
that the distillation step opens around its one `jax.jvp` (whose outputs take no gradient);
everywhere else (the student's loss and gradient, the teacher, training, sampling) the
fused kernels run exactly as without this module.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import jax

_STATE = threading.local()


@contextlib.contextmanager
def forward_mode():
    """While tracing inside this context, `models.attention` wraps the fused kernels with
    `with_blockwise_jvp` so `jax.jvp` can run through them (module doc)."""
    previous = active()
    _STATE.on = True
    try:
        yield
    finally:
        _STATE.on = previous


def active() -> bool:
    """Whether the code being traced is inside `forward_mode()`."""
    return getattr(_STATE, "on", False)


def with_blockwise_jvp(kernel: Callable, reference: Callable) -> Callable:
    """`f(q, k, v, masks) -> o`: `kernel`'s values with the JVP of `reference` (module doc).

    `kernel(q, k, v, masks)` is a fused kernel (no forward-mode rule); `reference(q, k, v,
    masks)` computes the same attention with one (the blockwise kernel). q `[B, L, N, E]`,
    k and v `[B, S, N, E]`; `masks` is any pytree of boolean or integer arrays (a key mask,
    segment ids; None leaves allowed), which get no tangent."""

    @jax.custom_jvp
    def fused(q, k, v, masks):
        return kernel(q, k, v, masks)

    @fused.defjvp
    def fused_jvp(primals, tangents):
        q, k, v, masks = primals
        dq, dk, dv = tangents[:3]  # masks are boolean/integer: their tangents are float0
        out = kernel(q, k, v, masks)
        with forward_mode():  # the reference's own JVP rule, wherever this rule is traced
            _, d_out = jax.jvp(lambda q, k, v: reference(q, k, v, masks), (q, k, v), (dq, dk, dv))
        return out, d_out.astype(out.dtype)

    return fused
