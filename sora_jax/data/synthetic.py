"""The built-in synthetic set: one coloured shape moving in a straight line on black.

Every clip is fully described by its caption, `"a red square moving left slowly"`, so a
model that follows the prompt can be checked from the pixels alone
(sora_jax.evaluation.adherence) without learned weights. Clip `i` of seed `s` is drawn from
`np.random.default_rng([s, i])`: any worker renders any clip, identically, in any order.

Geometry is in units of the frame so one spec renders at any resolution and frame count:

- positions are the object's centre in `[0, 1]` of the width (x, to the right) and of the
  height (y, downwards, image convention: 'down' means y grows);
- the object's side (bounding box) is `size * min(H, W)` pixels, so circles stay round in
  non-square frames;
- `SPEEDS` is the distance travelled from the first frame to the last, as a fraction of
  the frame extent along the motion axis. Deliberate divergence from a per-frame speed:
  a per-frame speed would carry the object out of the frame in long clips, and a spec
  drawn before the frame count is known could not guarantee it stays inside. A clip thus
  depicts `CLIP_SECONDS` of motion whatever its frame count, and its nominal frame rate
  is `(T - 1) / CLIP_SECONDS` (8 fps at the reference 9 frames, where 'slowly' is
  0.28 / 8 = 3.5% of the frame side per frame and 'quickly' 6.25%).

Two kinds of motion (`MOTIONS`; `data.source.motion` of a synthetic source, read by
`motion_of`):

- 'straight' (the default): no bouncing, no wrapping. The start is drawn so the whole
  object stays at least `MARGIN` inside the frame on every frame. Along the motion the
  object starts near the side it moves away from (a shape moving left starts on the
  right), as if it had just entered the frame, so its position on every frame follows
  from the caption; across the motion its position is free.
- 'wrap': the frame is a torus. What leaves one side re-enters from the opposite one, so
  the motion can continue for any number of frames (a video longer than its training clip
  can keep its direction and speed to the end). The start along the motion is uniform over
  the whole frame (the caption no longer fixes where the object is, only how it moves);
  across the motion it is drawn as for 'straight'. Coverage is exact on the torus: a point
  sample is inside when its offset from the centre, wrapped to the nearest image
  (`[-W/2, W/2)` along x, `[-H/2, H/2)` along y), is inside the shape, which counts every
  wrapped piece because an object spans at most `MAX_SIZE` < 1/2 of either side. The
  colour, shape, direction, speed and size of clip `i` of seed `s` are those of the
  straight clip `i` of seed `s` (the same draws); only the start differs. Direction and
  speed of wrapping clips are read back with the circular measure of
  sora_jax.evaluation.adherence (`motion='wrap'`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# RGB in [0, 1]. Pure primaries and secondaries are far apart in RGB and in hue; blue is
# lifted to (0, 0.35, 1) because pure (0, 0, 1) is dark on screens and after yuv420p.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
# How the object moves across the frame's edges (module docstring).
MOTIONS = ("straight", "wrap")
# Fraction of the frame extent along the motion axis travelled from the first frame to the
# last. 'slowly' must stay measurable (>= 25% of the side) and 'quickly' must still fit
# next to the largest object: MAX_SIZE + 2 * MARGIN + 0.50 = 0.96 <= 1.
SPEEDS: dict[str, float] = {"slowly": 0.28, "quickly": 0.50}
# Unit vectors of each direction in (x, y), y pointing down.
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
MIN_SIZE, MAX_SIZE = 0.30, 0.36  # object side, fraction of min(H, W)
MARGIN = 0.05  # gap kept between the object and the frame edge, fraction of the frame
# How far from the trailing margin a clip may start along its motion, fraction of the frame.
START_JITTER = 0.1
CLIP_SECONDS = 1.0  # duration depicted by a clip, first frame to last
IMAGE_FPS = 8.0  # nominal rate reported for a single frame, which has none
# k x k point samples per pixel for anti-aliased edges. 8 keeps the rendered area of a
# moving 16 px-frame triangle within ~5% of constant (4 gives ~10%) at ~0.6 ms per
# 9x32x32 clip; k * k must stay <= 255 (uint8 counts in `coverage`).
SUPERSAMPLE = 8


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """One clip's content. `size` is a fraction of min(H, W); `start` is the centre at the
    first frame as (x, y) fractions of (W, H); `motion` one of `MOTIONS`."""

    colour: str
    shape: str
    direction: str
    speed: str
    size: float
    start: tuple[float, float]
    motion: str = "straight"

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} {self.speed}"

    @property
    def displacement(self) -> tuple[float, float]:
        """(dx, dy) from the first frame to the last, as fractions of (W, H)."""
        ux, uy = DIRECTION_VECTORS[self.direction]
        d = SPEEDS[self.speed]
        return (ux * d, uy * d)

    def centres(self, num_frames: int) -> np.ndarray:
        """Object centre per frame, `[T, 2]` as (x, y) fractions of (W, H); a single frame
        (an image) shows the start. With `motion='wrap'` the centres are taken modulo 1
        (the object's place on the torus)."""
        frac = np.arange(num_frames, dtype=np.float64) / max(num_frames - 1, 1)  # [T]
        c = np.asarray(self.start)[None, :] + frac[:, None] * np.asarray(self.displacement)
        return np.mod(c, 1.0) if self.motion == "wrap" else c


def _check_word(caption: str, field: str, word: str, allowed) -> None:
    if word not in allowed:
        raise ValueError(
            f"caption {caption!r}: unknown {field} {word!r}; allowed {field}s: {sorted(allowed)}"
        )


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of `ClipSpec.caption`: `"a red square moving left slowly"` ->
    `dict(colour='red', shape='square', direction='left', speed='slowly')`."""
    words = caption.strip().lower().split()
    if len(words) != 6 or words[0] != "a" or words[3] != "moving":
        raise ValueError(
            f"caption {caption!r} does not read 'a <colour> <shape> moving <direction> "
            f"<speed>', e.g. 'a red square moving left slowly'"
        )
    _, colour, shape, _, direction, speed = words
    _check_word(caption, "colour", colour, COLOURS)
    _check_word(caption, "shape", shape, SHAPES)
    _check_word(caption, "direction", direction, DIRECTIONS)
    _check_word(caption, "speed", speed, SPEEDS)
    return dict(colour=colour, shape=shape, direction=direction, speed=speed)


def check_motion(motion: str, field: str = "data.source.motion") -> str:
    if motion not in MOTIONS:
        raise ValueError(f"{field}={motion!r} is unknown; choose one of {list(MOTIONS)}")
    return motion


def motion_of(config) -> str:
    """The synthetic motion of a run: `data.source.motion` when its source is synthetic,
    else 'straight'. `config` is the whole run config."""
    source = config.data.get("source", None)
    if source is None or source.get("name", "synthetic") != "synthetic":
        return "straight"
    return check_motion(str(source.get("motion", "straight")))


def clip_spec(index: int, seed: int = 0, motion: str = "straight") -> ClipSpec:
    """The spec of clip `index` of dataset `seed`; attributes are uniform and independent.
    `motion='wrap'` draws the same attributes with the start free along the motion."""
    if index < 0 or seed < 0:
        raise ValueError(f"clip_spec(index={index}, seed={seed}): both must be >= 0")
    check_motion(motion, "clip_spec(motion)")
    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    # The object's extent is at most `size` of either axis (size is relative to the shorter
    # side), so keeping `size / 2 + MARGIN` clear of both edges along the whole path keeps it
    # inside every frame shape.
    lo, hi = MARGIN + size / 2, 1.0 - MARGIN - size / 2
    travel = SPEEDS[speed]
    ux, uy = DIRECTION_VECTORS[direction]
    start = []
    for u in (ux, uy):
        # Along the motion the object enters from the trailing side (within START_JITTER of
        # the margin), so where it is on each frame follows from the caption; across the
        # motion it may start anywhere.
        # With wrapping, anywhere along the motion (the same one draw per axis, so the
        # attributes above stay those of the straight clip).
        a, b = lo, hi
        if u != 0 and motion == "wrap":
            a, b = 0.0, 1.0
        elif u < 0:
            a = max(hi - START_JITTER, lo + travel)
        elif u > 0:
            b = min(lo + START_JITTER, hi - travel)
        start.append(float(rng.uniform(a, b)))
    return ClipSpec(colour, shape, direction, speed, size, (start[0], start[1]), motion)


def coverage(spec: ClipSpec, num_frames: int, height: int, width: int) -> np.ndarray:
    """Fraction of each pixel covered by the object, `[T, H, W]` float32 in [0, 1].

    Estimated from `SUPERSAMPLE x SUPERSAMPLE` point samples per pixel, so sub-pixel motion
    changes edge pixels gradually instead of jumping whole pixels. With `motion='wrap'`
    each sample's offset from the centre is wrapped to the nearest image on the torus.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(
            f"render size num_frames={num_frames}, height={height}, width={width}: all must be >= 1"
        )
    k = SUPERSAMPLE
    centres = spec.centres(num_frames) * np.array([width, height])  # [T, 2] in pixels
    r = spec.size * min(height, width) / 2  # half side, pixels
    xs = (np.arange(width * k) + 0.5) / k  # [W*k] subsample x in pixels
    ys = (np.arange(height * k) + 0.5) / k  # [H*k]
    u = xs[None, None, :] - centres[:, 0, None, None]  # [T, 1, W*k] offset from centre
    v = ys[None, :, None] - centres[:, 1, None, None]  # [T, H*k, 1]
    if spec.motion == "wrap":  # nearest image: offsets in [-W/2, W/2) and [-H/2, H/2)
        u = np.mod(u + width / 2, width) - width / 2
        v = np.mod(v + height / 2, height) - height / 2
    elif spec.motion != "straight":
        raise ValueError(f"ClipSpec.motion={spec.motion!r} is unknown; known: {list(MOTIONS)}")
    if spec.shape == "square":
        inside = (np.abs(v) <= r) & (np.abs(u) <= r)
    elif spec.shape == "circle":
        inside = u * u + v * v <= r * r
    elif spec.shape == "triangle":
        # Apex up at (0, -r), base from (-r, r) to (r, r): the sides have slope 2.
        inside = (v <= r) & (v >= 2 * np.abs(u) - r)
    else:
        raise ValueError(f"ClipSpec.shape={spec.shape!r} is unknown; known: {list(SHAPES)}")
    # Average each pixel's k x k subsamples. Summing k strided slices twice is ~20x faster
    # than `.mean(axis=(2, 4))` on the [T, H, k, W, k] view, which dominated the cost.
    sub = np.ascontiguousarray(inside).view(np.uint8)
    sub = sub.reshape(num_frames * height, k, width * k)  # [T*H, k rows, W*k]
    rows = sum(sub[:, i] for i in range(k))  # [T*H, W*k], counts <= k
    rows = rows.reshape(num_frames * height * width, k)  # [T*H*W, k columns]
    cells = sum(rows[:, j] for j in range(k))  # [T*H*W], counts <= k*k <= 255
    return cells.reshape(num_frames, height, width).astype(np.float32) / np.float32(k * k)


def render(spec: ClipSpec, num_frames: int, height: int, width: int) -> np.ndarray:
    """The clip as float32 `[T, H, W, 3]` in [-1, 1]; the background is -1 (black).

    Each pixel is `-1 + 2 * coverage * colour`: a linear blend of black and the colour.
    """
    if spec.colour not in COLOURS:
        raise ValueError(f"ClipSpec.colour={spec.colour!r} is unknown; known: {list(COLOURS)}")
    cov = coverage(spec, num_frames, height, width)  # [T, H, W]
    rgb = np.asarray(COLOURS[spec.colour], dtype=np.float32)  # [3]
    return cov[..., None] * (2.0 * rgb) - 1.0


def synthetic_clip(
    index: int, seed: int, num_frames: int, height: int, width: int, motion: str = "straight"
) -> dict[str, Any]:
    """Clip `index` of dataset `seed` rendered at `[num_frames, height, width]`, with its
    caption, provenance, nominal frame rate and the attributes behind the caption; `motion`
    one of `MOTIONS`."""
    spec = clip_spec(index, seed, motion)
    fps = (num_frames - 1) / CLIP_SECONDS if num_frames > 1 else IMAGE_FPS
    return dict(
        video=render(spec, num_frames, height, width),
        caption=spec.caption,
        source_id=f"synthetic/{seed}/{index}",
        fps=float(fps),
        attributes=dataclasses.asdict(spec),
    )
