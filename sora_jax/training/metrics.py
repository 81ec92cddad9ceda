"""Metric sinks: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events.

Only process 0 writes. Names are namespaced with '/' (`train/loss`, `perf/steps_per_s`).
A value is a scalar (metrics.jsonl and a TensorBoard scalar) or an image, a uint8 array
`[H, W, 3]` such as the eval hook's sample contact sheets (a TensorBoard image only: the
image file itself is in the workdir).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

from sora_jax.diffusion import packed as packed_lib


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        images = {k: v for k, v in scalars.items() if _is_image(v)}
        clean = {k: _scalar(v) for k, v in scalars.items() if k not in images}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(k, v, int(step))
            for k, v in images.items():
                self._tb.add_image(k, v, int(step), dataformats="HWC")
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _is_image(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 3 and v.shape[-1] == 3


def _scalar(v) -> float | None:
    v = float(np.asarray(v))
    return v if math.isfinite(v) else None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_tensorboard(workdir: str | os.PathLike) -> dict[str, list[tuple[int, Any]]]:
    """`tag -> [(step, Summary.Value), ...]` of the TensorBoard events of a run (or of any
    directory holding event files), read without TensorBoard: each file is TFRecord
    framed (length u64, its crc u32, a serialized `Event`, its crc u32). A scalar's number
    is `value.simple_value`; an image is `value.image` (PNG bytes, height, width)."""
    root = pathlib.Path(workdir)
    root = root / "tensorboard" if (root / "tensorboard").is_dir() else root
    out: dict[str, list[tuple[int, Any]]] = {}
    for path in sorted(root.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((int(event.step), value))
    return out


def truncate_after(workdir: str | os.PathLike, step: int) -> None:
    """Drops metric lines after `step`: a resumed run rewrites them, never duplicates them."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file() or jax.process_index() != 0:
        return
    kept = [m for m in read_metrics(workdir) if m["step"] <= step]
    path.write_text("".join(json.dumps(m) + "\n" for m in kept))


def window_scalars(fetched: list[tuple[str, dict]], bins) -> dict[str, float]:
    """Means over the steps since the last log: every scalar metric, the loss per bucket
    (`train/loss/<bucket>`) and per timestep bin (`train/loss_t/<lo>-<hi>`), skips summed."""
    metrics = [m for _, m in fetched]
    out = {
        k: float(np.mean([m[k] for m in metrics]))
        for k in metrics[-1]
        if np.ndim(metrics[-1][k]) == 0
    }
    out["train/skipped"] = float(sum(m["train/skipped"] for m in metrics))
    for bucket in sorted({b for b, _ in fetched}):
        out[f"train/loss/{bucket}"] = float(
            np.mean([m["train/loss"] for b, m in fetched if b == bucket])
        )
    if "train/per_sample_loss" in metrics[-1] and "train/t" in metrics[-1]:
        losses = np.concatenate([np.ravel(m["train/per_sample_loss"]) for m in metrics])
        # t is [B], or [B, T'] with per-frame times: a sample's mean time names its bin.
        times = np.concatenate(
            [np.asarray(m["train/t"]).reshape(len(m["train/t"]), -1).mean(-1) for m in metrics]
        )
        for lo, hi in zip(bins[:-1], bins[1:], strict=True):
            sel = (times >= lo) & (times < hi) if hi < bins[-1] else (times >= lo)
            if sel.any():
                out[f"train/loss_t/{lo:.2f}-{hi:.2f}"] = float(losses[sel].mean())
    if "train/shape_class" in metrics[-1]:
        # Packed runs (diffusion/packed.py): the loss per shape class stands in for buckets.
        classes = np.concatenate([np.ravel(m["train/shape_class"]) for m in metrics])
        for i, name in enumerate(packed_lib.SHAPE_CLASSES):
            if (classes == i).any():
                out[f"train/loss_class/{name}"] = float(losses[classes == i].mean())
    return out
