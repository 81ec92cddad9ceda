"""Sharded, resumable evaluation over items (sora_jax.evaluation.evaluators' item evaluators).

The item evaluators (all but val_loss) are sharded and resumable: item i (a prompt or a
clip) belongs to process `p` of `P` when it lies in p's contiguous block
`[n p / P, n (p + 1) / P)`. Each item's result is written atomically to
`WORKDIR/eval/<step>/<type>/items/<i>.npz` and listed in that process's manifest
`done-<p>.txt`; a re-run skips listed items, and refuses a directory written with another
protocol (`protocol.json`). Process 0 aggregates when every item is done; a sample
depends only on its index, so any split (or interruption) gives the same numbers.

An `ItemEvaluator` says how many items there are, the protocol they are computed under,
how to compute a list of them and how to aggregate all of them; `run_items` runs this
process's pending items into an `ItemStore` and aggregates on process 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from sora_jax.evaluation import requests as requests_lib


def shard_range(n: int, process_index: int, process_count: int) -> range:
    """The contiguous block of items `[n p / P, n (p + 1) / P)` of process p of P."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    return range(n * process_index // process_count, n * (process_index + 1) // process_count)


class ItemStore:
    """Per-item results of one evaluation under `root` (module docstring)."""

    def __init__(self, root: pathlib.Path, protocol: dict[str, Any]):
        self.root = pathlib.Path(root)
        (self.root / "items").mkdir(parents=True, exist_ok=True)
        path = self.root / "protocol.json"
        text = json.dumps(protocol, indent=2, sort_keys=True, default=str)
        if path.is_file() and path.read_text() != text:
            raise ValueError(
                f"{self.root} holds results of another protocol ({path}); delete the directory "
                "to evaluate afresh, or re-run with the recorded settings"
            )
        if not path.is_file():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)

    def _item(self, i: int) -> pathlib.Path:
        return self.root / "items" / f"{i:06d}.npz"

    def done(self) -> set[int]:
        """Items listed in any process's manifest whose result file exists."""
        listed = set()
        for manifest in self.root.glob("done-*.txt"):
            listed |= {int(x) for x in manifest.read_text().split()}
        return {i for i in listed if self._item(i).is_file()}

    def write(self, i: int, result: dict[str, Any], process_index: int) -> None:
        tmp = self.root / "items" / f".{i:06d}.tmp{os.getpid()}.npz"
        np.savez(tmp, **{k: np.asarray(v) for k, v in result.items()})
        os.replace(tmp, self._item(i))  # atomic: a killed run leaves no half-written item
        with open(self.root / f"done-{process_index}.txt", "a") as f:
            f.write(f"{i}\n")

    def read(self, i: int) -> dict[str, np.ndarray]:
        with np.load(self._item(i), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}


@dataclasses.dataclass
class ItemEvaluator:
    """An evaluator over `count` items: `compute` results for a list of item indices,
    `aggregate` the results of all items in order into scores."""

    count: Callable[[ml_collections.ConfigDict], int]
    protocol: Callable[[ml_collections.ConfigDict, requests_lib.SampleOptions], dict[str, Any]]
    compute: Callable[..., list[dict[str, Any]]]
    aggregate: Callable[[ml_collections.ConfigDict, list[dict[str, np.ndarray]]], dict[str, Any]]
    needs_generator: bool = True


def run_items(
    evaluator: ItemEvaluator,
    config: ml_collections.ConfigDict,
    store: ItemStore,
    generator,
    options: requests_lib.SampleOptions,
    *,
    process_index: int,
    process_count: int,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Computes this process's pending items; returns `{'scores': ...}` from process 0 when
    every item is done, else `{'missing': [...]}` (or `{}` on other processes).

    `stop_after` stops after that many newly written items (a test hook for interruption).
    """
    n = evaluator.count(config)
    if n < 1:
        raise ValueError(f"evaluate.num_videos={n} must be >= 1")
    done = store.done()
    pending = [i for i in shard_range(n, process_index, process_count) if i not in done]
    batch = max(1, int(config.sample.batch_size))
    written = 0
    for lo in range(0, len(pending), batch):
        if stop_after is not None and written >= stop_after:
            break
        chunk = pending[lo : lo + batch]
        for i, result in zip(chunk, evaluator.compute(config, generator, options, chunk, batch)):
            if stop_after is not None and written >= stop_after:
                break
            store.write(i, result, process_index)
            written += 1
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"eval items {store.root}")
    if process_index != 0:
        return {"computed": written}
    done = store.done()
    missing = [i for i in range(n) if i not in done]
    if missing:
        return {"computed": written, "missing": missing}
    items = [store.read(i) for i in range(n)]
    return {"computed": written, "scores": evaluator.aggregate(config, items)}
