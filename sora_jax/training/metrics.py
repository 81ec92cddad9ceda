"""Metric sinks: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events.

Only process 0 writes. Names are namespaced with '/' (`train/loss`, `perf/steps_per_s`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax
import numpy as np


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {k: _scalar(v) for k, v in scalars.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if v is not None:
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _scalar(v) -> float | None:
    v = float(np.asarray(v))
    return v if math.isfinite(v) else None


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(workdir: str | os.PathLike, step: int) -> None:
    """Drops metric lines after `step`: a resumed run rewrites them, never duplicates them."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file() or jax.process_index() != 0:
        return
    kept = [m for m in read_metrics(workdir) if m["step"] <= step]
    path.write_text("".join(json.dumps(m) + "\n" for m in kept))
