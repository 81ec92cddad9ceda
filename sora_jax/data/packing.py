"""Packing clips of any shape into rows of a fixed token budget: every step `[B, L]`.

A native-shape dataset (sora_jax.data.native) holds clips of many shapes. Clip `i` with
latents `[T'_i, H'_i, W'_i, C]` and patch `(p_t, p_h, p_w)` is
`n_i = (T'_i / p_t)(H'_i / p_h)(W'_i / p_w)` tokens. The packer puts clips into rows of
`L = tokens_per_row` tokens, `B = rows_per_batch` rows per global step, so every step has
one shape and the run compiles one executable.

**The plan of epoch `e`** (`plan_epoch`, a pure function of the token counts, `seed`, `e`
and the options):

1. `π_e`: a permutation of the `N` clips drawn from `(seed, e)`.
2. `π_e` is cut into shuffle windows of `window` clips. In each window, first-fit
   decreasing: clips by `n_i` descending (ties: order in `π_e`), each into the first row
   with `>= n_i` free tokens and fewer than `max_segments` clips, a new row when none has.
3. The window's rows are shuffled (seeded by `(seed, e, window index)`), so big clips do
   not always lead, and appended to the epoch's rows `R_e`.

Global batch `j` of the epoch is rows `R_e[j B : (j + 1) B]`; the last batch of an epoch is
completed with empty (all-padding) rows, so every clip appears exactly once per epoch and
epoch `e` has `E_e = ceil(|R_e| / B)` steps. Step `s` is batch `s - Σ_{e' < e} E_e'` of the
first epoch `e` whose steps reach past `s`: the mapping needs the row counts of earlier
epochs, recomputed on demand (each epoch's plan is computed once and cached; a restart at
step `s` plans the epochs before it again, O(N log N) numpy work each).

**State** (`PackedPipeline.get_state`): `{step, seed, tokens_per_row, rows_per_batch,
window, max_segments, num_clips, shapes_hash}`, i.e. the next step plus what the mapping
depends on; `set_state` continues at that step with identical rows and refuses any other
difference, naming the field. Rows do not depend on the process count: each process
reads the rows it is given (`rows`; default: process `p` of `P` reads
`[p B/P, (p + 1) B/P)`), so a run split over 1 or P processes trains on the same global
batches.

**A row** (`PackedPipeline`, numpy, host side), `K = max_segments`, `D = p_t p_h p_w C`:

    tokens         [B, L, D]     float32  patchified latents, clips back to back, then zeros
    segment_ids    [B, L]        int32    k + 1 for the k-th clip of the row, 0 = padding
    positions      [B, L, 3]     int32    (t, h, w) patch coordinates inside its own clip
    segment_shapes [B, K, 3]     int32    each clip's patch grid (T'/p_t, H'/p_h, W'/p_w)
    text           [B, K, S, D]  float32  each clip's caption embeddings (or text_ids
    text_mask      [B, K, S]     bool     [B, K, S] int32 with embed='train_step')
    clip_index     [B, K]        int64    the clip's index in the dataset, -1 = none
    captions       list of B lists of str (host-side)

Tokens within a clip are in (t, h, w) row-major order of its patch grid, each token the
`p_t x p_h x p_w x C` block flattened in that order (as the DiT's patchify). The padding
fraction of an epoch is `1 - Σ n_i / (E_e B L)` (`PackPlan.report`).

**Training** (`data.packing.tokens_per_row > 0`, training/families.py `PackedDiT`): the
pipeline hands the loop host batches with `bucket = 'packed'` (one compiled step for the
run), `step`, and `layout`, the rows this process's devices hold (`global_batch.row_layout`
of the mesh: processes of one context or tensor group read the same rows), so
`global_batch.to_global_batch` assembles them like bucketed batches. The step fields are
`STEP_FIELDS` plus the text (`text` or `text_ids`) and `text_mask`; the model and the loss
are `VideoDiT`'s packed call and `diffusion/packed.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from sora_jax.data import global_batch, records, shards

# The numeric fields of a packed row the train step reads (the text fields follow).
STEP_FIELDS = ("tokens", "segment_ids", "positions", "segment_shapes")
BUCKET = "packed"  # the one schedule key of a packed run: one compiled step


@dataclasses.dataclass(frozen=True)
class PackingOptions:
    """`data.packing`: the row budget and the packing window."""

    tokens_per_row: int  # L: video tokens per row
    rows_per_batch: int  # B: rows per global step
    window: int = 1024  # clips per shuffle window packed together (first-fit decreasing)
    max_segments: int = 32  # K: clips per row at most (the per-segment arrays' size)

    def check(self) -> None:
        for field in ("tokens_per_row", "rows_per_batch", "window", "max_segments"):
            if getattr(self, field) < 1:
                raise ValueError(f"data.packing.{field}={getattr(self, field)} must be >= 1")


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in keys]])


def pack_window(tokens: np.ndarray, order: np.ndarray, capacity: int, max_segments: int):
    """First-fit decreasing of the clips `order` (indices into `tokens`) into rows of
    `capacity` tokens and at most `max_segments` clips; returns the rows (lists of clip
    indices, in placement order), in the order they were opened."""
    ranked = order[np.argsort(-tokens[order], kind="stable")]  # biggest first, ties by order
    free = np.zeros(len(ranked), np.int64)  # free tokens of each row opened so far
    count = np.zeros(len(ranked), np.int64)
    rows: list[list[int]] = []
    for i in ranked:
        n = tokens[i]
        fits = (free[: len(rows)] >= n) & (count[: len(rows)] < max_segments)
        r = int(np.argmax(fits)) if fits.any() else len(rows)
        if r == len(rows):
            rows.append([])
            free[r] = capacity
        rows[r].append(int(i))
        free[r] -= n
        count[r] += 1
    return rows


def plan_epoch(tokens: np.ndarray, seed: int, epoch: int, options: PackingOptions):
    """The rows of epoch `epoch` (module docstring): a list of int64 arrays of clip
    indices, every clip in exactly one row."""
    tokens = np.asarray(tokens, np.int64)
    perm = _rng(seed, 0, epoch).permutation(len(tokens))
    rows: list[np.ndarray] = []
    for w, start in enumerate(range(0, len(perm), options.window)):
        window = perm[start : start + options.window]
        packed = pack_window(tokens, window, options.tokens_per_row, options.max_segments)
        for k in _rng(seed, 1, epoch, w).permutation(len(packed)):
            rows.append(np.asarray(packed[k], np.int64))
    return rows


class PackPlan:
    """Step -> the global batch's rows, from token counts alone (no records read)."""

    def __init__(self, tokens: Sequence[int], seed: int, options: PackingOptions):
        options.check()
        self.tokens = np.asarray(tokens, np.int64)
        self.seed, self.options = int(seed), options
        if len(self.tokens) == 0:
            raise ValueError("nothing to pack: the dataset has no clips")
        too_long = self.tokens > options.tokens_per_row
        if too_long.any():
            raise ValueError(
                f"{int(too_long.sum())} clip(s) have more tokens (up to {int(self.tokens.max())})"
                f" than data.packing.tokens_per_row={options.tokens_per_row}: raise it, or "
                "re-tokenize with a smaller data.tokenize.max_area / max_frames"
            )
        self._epochs: dict[int, list[np.ndarray]] = {}
        self._steps: list[int] = []  # E_e of epochs 0, 1, ... computed so far

    def epoch(self, e: int) -> list[np.ndarray]:
        if e not in self._epochs:
            if len(self._epochs) >= 4:  # keep a few plans: the current and next epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = plan_epoch(self.tokens, self.seed, e, self.options)
        return self._epochs[e]

    def steps_in_epoch(self, e: int) -> int:
        while len(self._steps) <= e:
            rows = plan_epoch(self.tokens, self.seed, len(self._steps), self.options)
            self._steps.append(-(-len(rows) // self.options.rows_per_batch))
        return self._steps[e]

    def locate(self, step: int) -> tuple[int, int]:
        """`(epoch, batch index in the epoch)` of global step `step`."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        e = 0
        while step >= self.steps_in_epoch(e):
            step -= self.steps_in_epoch(e)
            e += 1
        return e, step

    def batch(self, step: int) -> list[np.ndarray]:
        """The `B` rows of step `step` (empty arrays for the filler rows of an epoch's end)."""
        e, j = self.locate(step)
        b = self.options.rows_per_batch
        rows = self.epoch(e)[j * b : (j + 1) * b]
        return rows + [np.zeros(0, np.int64)] * (b - len(rows))

    def report(self, epoch: int = 0) -> dict[str, Any]:
        """Padding and order figures of one epoch's plan."""
        rows = self.epoch(epoch)
        steps = self.steps_in_epoch(epoch)
        slots = steps * self.options.rows_per_batch * self.options.tokens_per_row
        useful = int(self.tokens.sum())
        perm = _rng(self.seed, 0, epoch).permutation(len(self.tokens))
        rank = np.empty(len(perm), np.int64)
        rank[perm] = np.arange(len(perm))  # each clip's place in the shuffle
        emitted = np.concatenate(rows)  # each clip's place in the packed order
        shift = np.abs(rank[emitted] - np.arange(len(emitted)))
        fills = np.array([self.tokens[r].sum() for r in rows]) / self.options.tokens_per_row
        return {
            "clips": len(self.tokens),
            "rows": len(rows),
            "steps": steps,
            "useful_tokens": useful,
            "token_slots": slots,
            "padding_fraction": 1.0 - useful / slots,
            "filler_rows": steps * self.options.rows_per_batch - len(rows),
            "clips_per_row": len(self.tokens) / len(rows),
            "min_row_fill": float(fills.min()),
            # how far packing moves a clip from its place in the shuffle, in clips
            "order_shift_mean": float(shift.mean()),
            "order_shift_max": int(shift.max()),
        }


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the config trains on packed rows (`data.packing.tokens_per_row > 0`)."""
    section = config.data.get("packing", None)
    return bool(section) and int(section.get("tokens_per_row", 0) or 0) > 0


def options_from_config(config: ml_collections.ConfigDict) -> PackingOptions:
    """`data.packing` (`tokens_per_row` required; `rows_per_batch` defaults to
    `data.global_batch_size`)."""
    section = config.data.get("packing", None) or {}
    get = section.get if hasattr(section, "get") else (lambda k, d: d)
    if not int(get("tokens_per_row", 0)):
        raise ValueError(
            "data.packing.tokens_per_row is not set: the token budget L of every packed row "
            "(at least the largest clip's tokens)"
        )
    return PackingOptions(
        tokens_per_row=int(get("tokens_per_row", 0)),
        rows_per_batch=int(get("rows_per_batch", 0) or config.data.global_batch_size),
        window=int(get("window", 1024)),
        max_segments=int(get("max_segments", 32)),
    )


def _patchify(latents: np.ndarray, patch: tuple[int, int, int]) -> np.ndarray:
    """`[T', H', W', C]` -> `[n, p_t p_h p_w C]`, tokens in (t, h, w) order."""
    t, h, w, c = latents.shape
    pt, ph, pw = patch
    x = latents.reshape(t // pt, pt, h // ph, ph, w // pw, pw, c)  # split into patches
    x = x.transpose(0, 2, 4, 1, 3, 5, 6)  # [T/pt, H/ph, W/pw, pt, ph, pw, C]
    return x.reshape(-1, pt * ph * pw * c)  # one row per token


def _grid(shape: Sequence[int]) -> np.ndarray:
    """`[n, 3]` (t, h, w) coordinates of a `(gt, gh, gw)` patch grid in row-major order
    (read-only: one array per shape, built once; it was 40% of a batch's host time)."""
    return _grid_of(tuple(int(s) for s in shape))


@functools.lru_cache(maxsize=4096)
def _grid_of(shape: tuple[int, ...]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    grid.setflags(write=False)
    return grid


class PackedPipeline:
    """Packed global batches of a native-shape dataset: this process's rows of step
    `step`, then the next (module docstring). Iterate it, or call `batch(step)`."""

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        options: PackingOptions,
        *,
        patch_size: Sequence[int],
        seed: int = 0,
        rows: Sequence[int] | None = None,
        process_index: int = 0,
        process_count: int = 1,
        layout: global_batch.RowLayout | None = None,
    ):
        self.dir = pathlib.Path(dataset_dir)
        manifest = shards.read_manifest(self.dir)
        self.manifest = manifest
        if manifest.get("mode") != "native":
            raise ValueError(
                f"{self.dir / shards.MANIFEST} is a bucketed dataset: packing reads datasets "
                "tokenized with data.tokenize.mode='native'"
            )
        section = manifest["native"]
        self.patch = tuple(int(p) for p in patch_size)
        self.files = [str(self.dir / f) for f in section["files"]]
        shapes = np.array(
            [s for f in section["files"] for s in section["shapes"][f]], np.int64
        ).reshape(-1, 3)  # [N, 3] latent (T', H', W') of every clip, in file order
        bad = np.any(shapes % np.array(self.patch), axis=1)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} clip(s) of {self.dir} have latent shapes not divisible by "
                f"model.patch_size={self.patch} (e.g. {shapes[bad][0].tolist()}): re-tokenize "
                "with data.tokenize.multiple a multiple of the patch"
            )
        self.grids = shapes // np.array(self.patch)  # [N, 3] patch grid of every clip
        self.embed = manifest["text_encoder"].get("embed", "tokenize")
        self.fields = (
            *STEP_FIELDS,
            "text_ids" if self.embed == "train_step" else "text",
            "text_mask",
        )
        self.options = options
        self.plan = PackPlan(self.grids.prod(axis=1), seed, options)
        self.source = grain.sources.ArrayRecordDataSource(self.files)
        self.shapes_hash = hashlib.sha256(json.dumps(shapes.tolist()).encode()).hexdigest()[:16]
        b = options.rows_per_batch
        if layout is not None:  # the rows of this process's devices' batch shards
            if b % layout.shards:
                raise ValueError(
                    f"data.packing.rows_per_batch={b} must be a multiple of the {layout.shards} "
                    "batch shards of the mesh (mesh data x fsdp)"
                )
            rows = layout.rows(b)
        self.layout = layout
        if rows is None:
            if b % process_count:
                raise ValueError(
                    f"data.packing.rows_per_batch={b} must be a multiple of the process count "
                    f"{process_count}"
                )
            per = b // process_count
            rows = range(process_index * per, (process_index + 1) * per)
        self.rows = [int(r) for r in rows]
        self.step = 0

    def get_state(self) -> dict[str, Any]:
        o = self.options
        return {
            "step": self.step,
            "seed": self.plan.seed,
            "tokens_per_row": o.tokens_per_row,
            "rows_per_batch": o.rows_per_batch,
            "window": o.window,
            "max_segments": o.max_segments,
            "num_clips": len(self.grids),
            "shapes_hash": self.shapes_hash,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        mine = self.get_state()
        diffs = sorted(k for k in mine if k != "step" and state.get(k) != mine[k])
        if diffs:
            raise ValueError(
                "the packed pipeline's saved state differs in "
                + ", ".join(f"{k} (saved {state.get(k)!r}, now {mine[k]!r})" for k in diffs)
                + ": the rows of later steps would not be those of the saved run; resume with "
                "the same data.packing, seed and dataset, or start a new workdir"
            )
        self.step = int(state["step"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        out = self.batch(self.step)
        out.update(bucket=BUCKET, step=self.step)
        if self.layout is not None:
            out["layout"] = self.layout
        self.step += 1
        return out

    def report(self) -> str:
        """The start-up lines: the budget, the clips and the first epoch's padding."""
        o, r = self.options, self.plan.report(0)
        return (
            f"data: packed rows of {o.tokens_per_row} tokens, {o.rows_per_batch} rows per step, "
            f"{r['clips']} clips of {len(np.unique(self.grids, axis=0))} shapes from {self.dir}; "
            f"epoch 0: {r['steps']} steps, padding {100 * r['padding_fraction']:.1f}%, "
            f"{r['clips_per_row']:.2f} clips per row"
        )

    def close(self) -> None:
        pass

    @functools.cache  # noqa: B019 (one pipeline per run: the cache lives as long as it)
    def _first(self) -> dict[str, Any]:
        """The first record, decoded once: the sizes of the token features and the text."""
        return records.decode_record(self.source[0])

    def batch(self, step: int) -> dict[str, Any]:
        """This process's rows of global step `step`."""
        o = self.options
        rows = self.plan.batch(step)
        n, k, length = len(self.rows), o.max_segments, o.tokens_per_row
        text_key = "text_ids" if self.embed == "train_step" else "text"
        first = self._first()  # sizes of D and of the text
        d = int(np.prod(self.patch)) * first["latents"].shape[-1]
        out = {
            "tokens": np.zeros((n, length, d), np.float32),
            "segment_ids": np.zeros((n, length), np.int32),
            "positions": np.zeros((n, length, 3), np.int32),
            "segment_shapes": np.zeros((n, k, 3), np.int32),
            text_key: np.zeros(
                (n, k, *np.shape(first[text_key])),
                np.int32 if text_key == "text_ids" else np.float32,
            ),
            "text_mask": np.zeros((n, k, *np.shape(first["text_mask"])), bool),
            "clip_index": np.full((n, k), -1, np.int64),
            "captions": [[] for _ in range(n)],
        }
        for r, row in enumerate(self.rows):
            cursor = 0
            for j, i in enumerate(rows[row]):
                rec = records.decode_record(self.source[int(i)])
                x = _patchify(np.asarray(rec["latents"], np.float32), self.patch)  # [n_i, D]
                span = slice(cursor, cursor + len(x))
                out["tokens"][r, span] = x
                out["segment_ids"][r, span] = j + 1
                out["positions"][r, span] = _grid(self.grids[i])
                out["segment_shapes"][r, j] = self.grids[i]
                out["clip_index"][r, j] = i
                out[text_key][r, j] = rec[text_key]
                out["text_mask"][r, j] = rec["text_mask"]
                out["captions"][r].append(rec["caption"])
                cursor += len(x)
        return out


def from_config(
    config: ml_collections.ConfigDict,
    dataset_dir: str | os.PathLike,
    *,
    process_index: int = 0,
    process_count: int = 1,
    layout: global_batch.RowLayout | None = None,
) -> PackedPipeline:
    """The packed pipeline of `config.data.packing` over a native dataset (`layout`: the
    rows of the mesh's batch shards this process holds, `global_batch.row_layout`)."""
    return PackedPipeline(
        dataset_dir,
        options_from_config(config),
        patch_size=tuple(config.model.patch_size),
        seed=int(config.seed),
        process_index=process_index,
        process_count=process_count,
        layout=layout,
    )
