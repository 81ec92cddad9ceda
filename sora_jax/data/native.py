"""Native-shape tokenization (`data.tokenize.mode = 'native'`): every clip keeps its aspect
ratio and duration, resized only to a pixel and frame budget.

A clip of `n` frames (at the target frame rate) and `h x w` displayed pixels becomes

    s = min(1, sqrt(max_area / (h w)))            (max_area = 0: s = 1, no budget)
    H = floor(h s / m) m,  W = floor(w s / m) m   m = `multiple`
    T = the largest frame count <= min(n, max_frames) that the tokenizer accepts
        (`check_frames`: 1 + 4k for the causal VAE) whose latent frames T' are a multiple
        of the temporal patch

with `m` = the tokenizer's spatial compression times the model's spatial patch (16 for a
VAE of stride 8 with patch 2), so every clip patchifies exactly. The frame is resized to
cover `H x W` (the larger of `H/h`, `W/w`, never above `s`) and centre-cropped: the crop is
the rounding only, under `m` pixels per side at the clip's scale. Nothing is enlarged: a
side under `m` pixels is a `too_small` reject, fewer frames than the smallest accepted
count `too_short`. Clips are cut in windows of `T` frames exactly as in bucketed mode
(`data.tokenize.clip_stride`, `max_clips_per_video`).

The job writes every clip of unit `u` to `native/native-<u:05d>.array_record` (records
grouped by shape, in input order within a shape) with its latent shape in the record
(`shape`, int32 `[T', H', W']`) and in the manifest's `native` section (per file, every
record's shape in file order), which is what a packer reads (sora_jax.data.packing);
manifests of native datasets have `schema_version` 2 and `mode: 'native'`
(docs/formats.md). Sparse-bucket demotion does not apply; a held-out split is not yet
supported in this mode.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from sora_jax.data import buckets as buckets_lib
from sora_jax.data import shards

MODES = ("buckets", "native")
SHARD = "native"  # the directory and shard prefix of a native dataset's clips
# data.tokenize fields of this mode, with their defaults (docs/data_pipeline.md)
FIELDS = {"max_area": 0, "max_frames": 0, "multiple": 0}


def mode(config: ml_collections.ConfigDict) -> str:
    """`data.tokenize.mode` ('buckets' when absent), checked."""
    section = config.data.get("tokenize", None) or {}
    value = section.get("mode", "buckets") if hasattr(section, "get") else "buckets"
    if value not in MODES:
        raise ValueError(f"data.tokenize.mode={value!r} is unknown; choose one of {MODES}")
    return value


@dataclasses.dataclass(frozen=True)
class NativeOptions:
    """The budget of native mode (module docstring), resolved against the tokenizer."""

    max_area: int = 0  # pixels per frame (H x W) a clip is shrunk to at most; 0 = no limit
    max_frames: int = 0  # pixel frames per clip at most; 0 = no limit
    multiple: int = 16  # sides are multiples of this (tokenizer stride x patch)
    temporal: int = 1  # the tokenizer's temporal compression r (T = 1 + r k when r > 1)
    patch_frames: int = 1  # the model's temporal patch: T' must be a multiple of it

    def latent_frames(self, frames: int) -> int:
        """`T'` of `T` pixel frames: `T` for r = 1, `1 + (T - 1) / r` (causal) otherwise."""
        return frames if self.temporal == 1 else 1 + (frames - 1) // self.temporal

    def frames_ok(self, frames: int) -> bool:
        if frames < 1:
            return False
        if self.temporal > 1 and (frames - 1) % self.temporal:
            return False
        return self.latent_frames(frames) % self.patch_frames == 0

    def frames_for(self, available: int) -> int:
        """The largest accepted frame count `<= min(available, max_frames)`; 0 if none."""
        n = min(available, self.max_frames) if self.max_frames > 0 else available
        step = self.temporal * self.patch_frames  # valid counts repeat with this period
        for t in range(n, max(n - step - 1, 0), -1):
            if self.frames_ok(t):
                return t
        return 0

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """`(H, W)`: the sides after the area budget, floored to `multiple` (0 if under)."""
        s = 1.0
        if self.max_area > 0 and height * width > self.max_area:
            s = math.sqrt(self.max_area / (height * width))
        m = self.multiple
        return (int(height * s + 1e-6) // m * m, int(width * s + 1e-6) // m * m)

    def bucket(self, frames: int, height: int, width: int) -> buckets_lib.Bucket | str:
        """The clip's own shape as a `Bucket` named `<T>x<H>x<W>`, or the reject reason
        ('too_short' or 'too_small')."""
        t = self.frames_for(frames)
        if t == 0:
            return "too_short"
        h, w = self.size_for(height, width)
        if h < self.multiple or w < self.multiple:
            return "too_small"
        return buckets_lib.Bucket(name=f"{t}x{h}x{w}", frames=t, height=h, width=w)


def options_from_config(config: ml_collections.ConfigDict, tokenizer) -> NativeOptions:
    """`data.tokenize.{max_area,max_frames,multiple}` resolved with the tokenizer's
    compression and `model.patch_size` (absent: 1)."""
    section = config.data.get("tokenize", None) or {}
    get = section.get if hasattr(section, "get") else (lambda k, d: d)
    t_comp, h_comp, w_comp = tokenizer.manifest_entry()["compression"]
    model = config.get("model", None) or {}
    patch = tuple(model.get("patch_size", (1, 1, 1))) if hasattr(model, "get") else (1, 1, 1)
    if h_comp != w_comp or patch[1] != patch[2]:
        raise ValueError(
            f"data.tokenize.mode='native' needs square spatial compression and patches, got "
            f"tokenizer compression {[t_comp, h_comp, w_comp]} and model.patch_size {patch}"
        )
    auto = int(h_comp) * int(patch[1])
    multiple = int(get("multiple", 0)) or auto
    if multiple % auto:
        raise ValueError(
            f"data.tokenize.multiple={multiple} must be a multiple of the tokenizer's spatial "
            f"compression x model.patch_size = {auto} (0 = exactly that)"
        )
    opts = NativeOptions(
        max_area=int(get("max_area", 0)),
        max_frames=int(get("max_frames", 0)),
        multiple=multiple,
        temporal=int(t_comp),
        patch_frames=int(patch[0]),
    )
    if opts.max_area < 0 or opts.max_frames < 0:
        raise ValueError(
            f"data.tokenize.max_area={opts.max_area} and max_frames={opts.max_frames} must be "
            ">= 0 (0 = no limit)"
        )
    if 0 < opts.max_area < multiple * multiple:
        raise ValueError(
            f"data.tokenize.max_area={opts.max_area} is under one {multiple}x{multiple} patch "
            "block: every clip would be too small; raise it or set 0 (no limit)"
        )
    if opts.max_frames > 0 and opts.frames_for(opts.max_frames) == 0:
        raise ValueError(
            f"data.tokenize.max_frames={opts.max_frames} admits no frame count the tokenizer "
            f"accepts (temporal compression {t_comp}, temporal patch {patch[0]}); raise it"
        )
    return opts


def check_supported(config: ml_collections.ConfigDict) -> None:
    """What native mode does not do yet, as errors naming the field."""
    section = config.data.get("tokenize", None) or {}
    if float(section.get("holdout_fraction", 0.0) or 0.0) > 0:
        raise ValueError(
            "data.tokenize.holdout_fraction must be 0 with data.tokenize.mode='native': the "
            "held-out split and its evaluators read fixed-shape buckets (not yet supported "
            "for native shapes); set --config.data.tokenize.holdout_fraction=0"
        )
    if config.data.source.name == "tfds":
        raise ValueError(
            "data.source.name='tfds' has no native mode yet: use data.tokenize.mode='buckets' "
            "or export the videos to files (data.source.name='videos')"
        )


def manifest_entry(out, markers: list[dict], opts: NativeOptions) -> dict[str, Any]:
    """`manifest.native`: the budget, and per shard file every record's latent shape."""
    files, shapes, counts = [], {}, {}
    for m in markers:
        per = m.get("shapes_by_bucket", {}).get(SHARD, [])
        if not per:
            continue
        name = str(shards.shard_path(out, SHARD, m["unit"]).relative_to(out))
        files.append(name)
        shapes[name] = per
        for s in per:
            key = "x".join(str(x) for x in s)
            counts[key] = counts.get(key, 0) + 1
    return {
        "options": dataclasses.asdict(opts),
        "count": sum(len(v) for v in shapes.values()),
        "files": files,
        "shapes": shapes,  # file -> [[T', H', W'], ...] in record order
        "shape_counts": dict(sorted(counts.items())),
    }


def is_native(manifest: dict[str, Any]) -> bool:
    """Whether a dataset manifest is a native-shape dataset (`mode: 'native'`)."""
    return manifest.get("mode") == "native"


def init_manifest(config: ml_collections.ConfigDict, manifest: dict[str, Any]) -> dict[str, Any]:
    """A native `manifest` with one bucket of a single patch (`[p_t, p_h, p_w, C]`) under
    the first name of `data.buckets`: what `run.setup.example_inputs` initializes (and the
    sampler restores) the model from; parameters do not depend on the video's shape, and a
    native manifest has no buckets. Other manifests come back unchanged."""
    if not is_native(manifest):
        return manifest
    names = [b.name for b in buckets_lib.buckets_from_config(config.data)]
    if not names:
        raise ValueError(
            "data.buckets is empty: a run on a native-shape dataset still names one bucket "
            "(any shape) from which the model is initialized; keep the config's data.buckets"
        )
    c = int(manifest["tokenizer"]["latent_channels"])
    shape = [*(int(p) for p in config.model.patch_size), c]
    return {**manifest, "buckets": {names[0]: {"shape": shape}}}


def sample_shape_errors(
    config: ml_collections.ConfigDict, tokenizer, frames: int, height: int, width: int
) -> list[str]:
    """What keeps a run trained on native shapes (packed rows) from sampling `frames x
    height x width` pixels: the frame count and sides the tokenizer and patch accept are
    checked by the caller; here the budget the model was trained within, as errors naming
    the sampler's flag (`--num_frames`, `--resolution`) and the allowed range:

        T <= data.tokenize.max_frames,  H W <= data.tokenize.max_area  (when > 0),
        (T' / p_t)(H / m_h)(W / m_w) <= data.packing.tokens_per_row     (one clip per row)

    with `T'` the latent frames and `m = stride x patch`; a clip longer than a row was never
    trained on (its positions and sequence length were never seen)."""
    opts = options_from_config(config, tokenizer)
    section = config.data.get("packing", None) or {}
    length = int(section.get("tokens_per_row", 0) or 0) if hasattr(section, "get") else 0
    _, s, _ = tokenizer.manifest_entry()["compression"]
    patch = tuple(int(p) for p in config.model.get("patch_size", None) or (1, 1, 1))
    errors = []
    if opts.max_frames > 0 and frames > opts.max_frames:
        errors.append(
            f"--num_frames={frames} is over the trained budget data.tokenize.max_frames="
            f"{opts.max_frames}; use 1..{opts.frames_for(opts.max_frames)} frames"
        )
    if opts.max_area > 0 and height * width > opts.max_area:
        errors.append(
            f"--resolution={height}x{width} ({height * width} pixels) is over the trained "
            f"budget data.tokenize.max_area={opts.max_area} pixels per frame; pick sides in "
            f"multiples of {opts.multiple} with height x width <= {opts.max_area}"
        )
    latent_t = opts.latent_frames(frames)
    tokens = (latent_t // patch[0]) * (height // (s * patch[1])) * (width // (s * patch[2]))
    if length > 0 and tokens > length:
        per_frame = (height // (s * patch[1])) * (width // (s * patch[2]))
        fits = [
            t
            for t in range(frames, 0, -1)
            if opts.frames_ok(t) and opts.latent_frames(t) // patch[0] * per_frame <= length
        ]
        fix = (
            f"at {height}x{width} use --num_frames <= {fits[0]}, or a smaller --resolution"
            if fits
            else f"no frame count fits at {height}x{width}: use a smaller --resolution"
        )
        errors.append(
            f"--num_frames={frames} --resolution={height}x{width} is {tokens} video tokens "
            f"(latent frames/{patch[0]} x height/{s * patch[1]} x width/{s * patch[2]}), over "
            f"the packed rows' budget data.packing.tokens_per_row={length} the model was "
            f"trained within; {fix}"
        )
    return errors
