"""TPU slices that are not there: compile-only devices of a named topology.

With `libtpu` installed (the `tpu` extra), JAX describes any TPU slice on any host:
`jax.experimental.topologies.get_topology_desc` returns devices that cannot run anything
but that XLA compiles for, Mosaic (Pallas) kernels included, with the real executable's
`memory_analysis()`. `--mode=plan --topology=v5p-64` plans a job this way from a laptop
before the slice is reserved (docs/launching.md).

Names: the topology itself, `GEN:AxB` or `GEN:AxBxC` (`v5e:4x4`, `v6e:8x8`, `v5p:4x4x4`),
or the slice names users reserve: `v5p-128`, `v4-32` (TensorCores: two per chip),
`v5litepod-16`, `v5e-16`, `v6e-64` (chips).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from sora_jax.parallel import compiler_flags

# Generations: (topology prefix, dimensions of its torus, TensorCores per chip in its
# slice names). v4 and v5p are 3D tori named by cores; v5e and v6e are 2D, named by chips.
GENERATIONS = {
    "v4": ("v4", 3, 2),
    "v5p": ("v5p", 3, 2),
    "v5e": ("v5e", 2, 1),
    "v5litepod": ("v5e", 2, 1),
    "v6e": ("v6e", 2, 1),
}


class TopologyError(ValueError):
    """A topology name that cannot be planned."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    generation: str  # v4 | v5p | v5e | v6e
    shape: tuple[int, ...]  # chips along each torus axis
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices

    @property
    def topology_name(self) -> str:
        """The name libtpu knows, e.g. 'v5p:4x4x4'."""
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.name} ({self.topology_name}{slices}, {self.chips} chips)"


def _shape_for(chips: int, dims: int) -> tuple[int, ...]:
    """The torus of a slice of `chips` chips: 2x2(x1) at 4 chips, then doubling the last of
    the smallest axes (8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4; 2D: 8 -> 2x4,
    16 -> 4x4, 32 -> 4x8), as TPU slices are laid out."""
    if chips == 1 and dims == 2:
        return (1, 1)
    if chips < 4 or chips & (chips - 1):
        raise ValueError(chips)
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse(name: str, num_slices: int = 1) -> Topology:
    """A topology from `GEN:AxBxC` or a slice name such as `v5p-128`."""
    if num_slices < 1:
        raise TopologyError(f"--num_slices={num_slices} must be at least 1")
    text = name.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", text)
    if m and m.group(1) in GENERATIONS:
        gen, dims, _ = GENERATIONS[m.group(1)]
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != dims:
            raise TopologyError(
                f"--topology={name!r}: {gen} slices are {dims}D tori (e.g. "
                f"{gen}:{'x'.join(['2'] * dims)}), got {len(shape)} dimensions"
            )
        return Topology(name, gen, shape, num_slices)
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    if m and m.group(1) in GENERATIONS:
        gen, dims, cores_per_chip = GENERATIONS[m.group(1)]
        count = int(m.group(2))
        chips = count // cores_per_chip
        try:
            if count % cores_per_chip:
                raise ValueError(count)
            shape = _shape_for(chips, dims)
        except ValueError:
            unit = "TensorCores (2 per chip)" if cores_per_chip == 2 else "chips"
            raise TopologyError(
                f"--topology={name!r}: the number after '-' counts {unit} and must give a "
                f"power-of-two slice of at least 4 chips; name the torus instead, e.g. "
                f"{gen}:{'x'.join(['2'] * dims)}"
            ) from None
        return Topology(name, gen, shape, num_slices)
    known = ", ".join(sorted(GENERATIONS))
    raise TopologyError(
        f"--topology={name!r} is not a TPU topology: use GEN:AxB[xC] or GEN-N with GEN one "
        f"of {known}, e.g. v5e:4x4, v5p:4x4x4, v5p-128, v6e-64"
    )


def devices(topology: Topology) -> list:
    """The compile-only devices of `topology` (all slices), with the production compiler
    flags of sora_jax/parallel/compiler_flags.py applied first, so a plan compiles what a
    run on that slice would run."""
    compiler_flags.apply("tpu")
    # Compile-only devices hold no TPU: let several planning processes load libtpu at once
    # (libtpu otherwise takes a host-wide lock, /tmp/libtpu_lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always ships it
        raise TopologyError(f"this jax cannot describe TPU topologies: {e}") from e
    kwargs = {"num_slices": topology.num_slices} if topology.num_slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(
            topology_name=topology.topology_name, platform="tpu", **kwargs
        )
    except Exception as e:  # libtpu missing or the name refused: say what to do
        raise TopologyError(
            f"--topology={topology.name!r}: JAX could not describe {topology.topology_name} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Planning for a TPU needs "
            "libtpu: pip install 'sora_jax[tpu]' (it brings jax[tpu]); no TPU is needed"
        ) from e
    return list(desc.devices)
