"""The global bucket schedule: which bucket each step trains on, the same on every host.

`bucket_schedule(seed, s, weights)` hashes `(seed, s)` to a uniform `u ∈ [0, 1)` and
inverts the CDF of the normalized weights, so the bucket of step `s` is a pure function of
`(seed, s, weights)`: no host communicates to agree on it, a resumed run derives the same
buckets, and any step can be looked up without replaying the ones before it.

Hosts that were started with different configs or datasets would still derive different
buckets, and a multi-host job would then hang in its first collective with mismatched
shapes. `check_schedule_agreement` turns that into an error: the training loop calls it
every `data.schedule_check_every_steps` steps and every process contributes a 64-bit
fingerprint of what it will read at that step.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sora_jax.data.pipeline import Pipeline

# Steps per chunk when counting earlier draws of each bucket (see Schedule).
CHUNK = 1 << 16
_M64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer (Steele et al. 2014): a bijective 64-bit mix, uint64 -> uint64."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_M64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_ints(*words: int | np.ndarray) -> np.ndarray:
    """Counter-based hash of a tuple of integers (arrays broadcast), uint64."""
    h = np.zeros((), np.uint64)
    with np.errstate(over="ignore"):
        for w in words:
            # Python ints (any sign) reduced mod 2^64; int64 arrays wrap the same way.
            w = np.uint64(w % 2**64) if isinstance(w, int) else np.asarray(w).astype(np.uint64)
            h = _splitmix64(h ^ w)
    return h


def bucket_schedule(seed: int, steps: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Bucket index of each global step; identical on every host.

    `u = hash(seed, step) / 2^64 ∈ [0, 1)`, bucket `= min{i : u < Σ_{j ≤ i} w_j / Σ w}`, so
    bucket `i` is drawn with probability `w_i / Σ w` and a zero weight is never drawn.

    Args:
      seed: the run's seed.
      steps: int[...] global step indices.
      weights: w[B], non-negative, not all zero.

    Returns:
      int32[...] bucket indices, the shape of `steps`.
    """
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or w.size == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"bucket weights must be non-negative and not all zero, got {weights}")
    cdf = np.cumsum(w) / w.sum()
    steps = np.asarray(steps, np.int64)
    u = (hash_ints(seed, 0x5EED_B0C4E7, steps) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    # side='right' skips zero-weight buckets (empty CDF intervals); the clip guards the
    # last CDF value rounding below 1.
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(w) - 1).astype(np.int32)


class Schedule:
    """`locate(step) -> (bucket, k)`: the step's bucket and how often it was drawn before.

    Draw counts are kept at chunk boundaries (`CHUNK` steps), computed vectorized on
    first use, so jumping to step 10^7 on resume costs ~150 vectorized chunks, once.
    """

    def __init__(self, seed: int, weights: Sequence[float]):
        self.seed, self.weights = seed, list(weights)
        self._before = [np.zeros(len(self.weights), np.int64)]  # counts at chunk starts
        self._chunk: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()

    def _chunk_buckets(self, c: int) -> np.ndarray:
        if self._chunk is None or self._chunk[0] != c:
            steps = np.arange(c * CHUNK, (c + 1) * CHUNK)
            self._chunk = (c, bucket_schedule(self.seed, steps, self.weights))
        return self._chunk[1]

    def _counts_at_chunk(self, c: int) -> np.ndarray:
        """int64[B] draw counts of steps before chunk `c` (call with the lock held)."""
        while len(self._before) <= c:
            done = len(self._before) - 1
            counts = np.bincount(self._chunk_buckets(done), minlength=len(self.weights))
            self._before.append(self._before[-1] + counts)
        return self._before[c]

    def counts_before(self, step: int) -> np.ndarray:
        """int64[B]: how many of the steps `0 … step - 1` drew each bucket."""
        c, i = divmod(step, CHUNK)
        with self._lock:
            before = self._counts_at_chunk(c)
            return before + np.bincount(self._chunk_buckets(c)[:i], minlength=len(self.weights))

    def locate(self, step: int) -> tuple[int, int]:
        c, i = divmod(step, CHUNK)
        with self._lock:
            before = self._counts_at_chunk(c)
            chunk = self._chunk_buckets(c)
            bucket = int(chunk[i])
            return bucket, int(before[bucket] + np.count_nonzero(chunk[:i] == bucket))


def schedule_fingerprint(pipeline: Pipeline, step: int) -> int:
    """64-bit hash of what `pipeline` reads at global `step`, equal on agreeing hosts.

    It covers the seed, the step, the bucket drawn and how often it was drawn before, that
    bucket's global batch, epoch and batch index, and every bucket's name, weight, record
    count and global batch: the things every process must agree on. It leaves out the
    process index and count (each process reads different rows of the same global batch).
    """
    b, k = pipeline.locate(step)
    epoch, j = pipeline.epoch_and_batch(b, k)
    table = [(s.key, s.weight, s.count, s.global_batch) for s in pipeline.buckets]
    table_crc = zlib.crc32(json.dumps(table).encode())
    spec = pipeline.buckets[b]
    return int(hash_ints(pipeline.seed, step, b, k, epoch, j, spec.global_batch, table_crc))


def check_schedule_agreement(pipeline: Pipeline, step: int) -> int:
    """Raises RuntimeError unless every process derives the same batch plan for `step`.

    A collective: every process must call it at the same step (the training loop does, at
    the first step and every `data.schedule_check_every_steps`). With one process it only
    computes the fingerprint. Returns the fingerprint.
    """
    from jax.experimental import multihost_utils

    fp = schedule_fingerprint(pipeline, step)
    # int32 halves: JAX keeps 32-bit integers unless jax_enable_x64 is set.
    words = np.array([fp >> 32, fp & 0xFFFFFFFF], np.uint32).view(np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(words)).reshape(-1, 2)  # [P, 2]
    differ = [p for p in range(everyone.shape[0]) if (everyone[p] != everyone[0]).any()]
    if differ:
        b, k = pipeline.locate(step)
        spec = pipeline.buckets[b]
        raise RuntimeError(
            f"data: at step {step} processes {differ} derive another batch plan than process 0 "
            f"(this process draws bucket {spec.key!r}, draw {k}, global batch "
            f"{spec.global_batch}, seed {pipeline.seed}): every process must run the same "
            "config (seed, data.*) on the same datasets; compare their WORKDIR/config.json "
            "and dataset manifests"
        )
    return fp
