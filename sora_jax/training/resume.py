"""Resuming a run: the newest committed checkpoint that reads back, refused with the
differing fields named when the config changes the train state's structure, and an
unreadable checkpoint moved aside (never deleted) so the run falls back to the previous one.

A resume is bit-identical to an uninterrupted run only when it runs the same compiled
step. Each process of a run records what its steps compute (`training/plan.py`
`step_fingerprint`, per bucket) in `WORKDIR/compiled_steps.jsonl`; a resumed process
compares its own with those of the process whose steps led to the checkpoint and names
every bucket whose step changed (edited model or loss code, another JAX or XLA, other
compiler flags or devices): the run goes on, but its numbers may differ from an
uninterrupted run's in the last bits and grow apart from there.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import jaxlib
from jax.experimental import multihost_utils

from sora_jax.run import checkpoint as ckpt_lib

log = logging.getLogger(__name__)


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, name + ".")
        elif a != b and not (isinstance(a, list | tuple) and list(a) == list(b or [])):
            out.append(f"{name}: checkpoint {a!r} -> now {b!r}")
    return out


def check_resume_structure(directory, step: int, abstract_state, config_json: dict) -> None:
    """Refuses to resume into a state of another structure (leaf names or shapes), naming
    the differing leaves and the config fields that changed since the checkpoint."""
    saved = ckpt_lib.saved_shapes(pathlib.Path(directory), step, "")
    if not saved:
        raise OSError(f"{directory}/{step}/state has no readable array metadata")
    wanted = ckpt_lib.flat_shapes(ckpt_lib.stored(abstract_state))  # a LoRA base is not saved
    report = ckpt_lib.load_report(saved, wanted)
    if not any(report.values()):
        return
    leaves = [f"{k} {n}" for k in ("missing", "unexpected", "reshaped") for n in report[k]]
    old = ckpt_lib.saved_config(directory, step)
    fields = _config_diff(old, config_json) if old is not None else ["(no config saved)"]
    raise StructureError(
        f"cannot resume from {directory}/{step}: the config changes the train state's "
        f"structure.\n  config fields that differ:\n    " + "\n    ".join(fields or ["none"])
        + "\n  state leaves that differ (first 10):\n    " + "\n    ".join(leaves[:10])
        + "\nuse a new --workdir, or start it from this run with --init_from="
        f"{pathlib.Path(directory).parent}"
    )  # fmt: skip


class StructureError(ValueError):
    """The checkpoint holds a train state of another structure than the config builds."""


def restore_for_resume(mngr, abstract_state, config_json: dict):
    """`(state, data_state, step)` of the newest committed checkpoint that reads back.

    Newest first: a step whose files cannot be read is skipped with a warning; a step that
    reads but holds another state structure stops the run (StructureError), since an
    older step would not fit either. None when no checkpoint restores.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            check_resume_structure(mngr.directory, step, abstract_state, config_json)
            return ckpt_lib.restore(mngr, abstract_state, step)
        except StructureError:
            raise
        except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is skipped, loudly
            # Moved aside, not deleted (nothing is lost), so the run can save this step anew.
            aside = pathlib.Path(mngr.directory) / f"{step}.unreadable"
            if jax.process_index() == 0:
                (pathlib.Path(mngr.directory) / str(step)).rename(aside)
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
            mngr.reload()
            log.warning(
                "checkpoint %s/%d could not be restored (%s: %s); moved it to %s and trying "
                "the previous one",
                mngr.directory,
                step,
                type(e).__name__,
                (str(e).splitlines() or [""])[0][:200],
                aside.name,
            )
    return None


STEPS_FILE = "compiled_steps.jsonl"


def record_compiled_steps(workdir, start: int, fingerprints: dict[str, str]) -> list[str]:
    """Appends this process's compiled steps to WORKDIR/compiled_steps.jsonl and returns a
    line per bucket whose step differs from the one that computed the steps before `start`.

    Records of processes that started at or after `start` are dropped first (their steps
    were not kept, as metrics after the checkpoint are not), so the last one left is the
    process this one continues. Process 0 reads and writes; the others return nothing.
    """
    if jax.process_index() != 0:
        return []
    path = pathlib.Path(workdir) / STEPS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    records = [r for r in map(json.loads, lines) if r["start_step"] < start]
    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    mine = {"start_step": start, "steps": fingerprints, **versions}
    path.write_text("".join(json.dumps(r) + "\n" for r in [*records, mine]))
    if not records:
        return []
    last = records[-1]
    changed = [
        f"bucket {b}: step {last['steps'][b]} -> {fp}"
        for b, fp in sorted(fingerprints.items())
        if fp and last["steps"].get(b) and last["steps"][b] != fp
    ]
    changed += [f"{k} {last[k]} -> {v}" for k, v in versions.items() if last.get(k, v) != v]
    if not changed:
        return []
    return [
        f"resumed at step {start} with another compiled step than the process that trained "
        f"steps {last['start_step'] + 1}-{start} ({STEPS_FILE}): the model or loss code, "
        "JAX/XLA, the compiler flags or the devices changed, so this run may differ from an "
        "uninterrupted one from here (bit-identical resume needs the same step):"
    ] + [f"  {c}" for c in changed]
