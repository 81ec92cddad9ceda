r"""Wan 2.1 transformer <-> sora_jax checkpoints: the command line of the Wan import/export.

    python -m sora_jax.wan import --src=Wan2.1-T2V-1.3B-Diffusers/transformer \
        --out=runs/wan_1_3b_init [--preset=wan2_1_1_3b] [--scan_layers=false]
    python -m sora_jax.wan export --src=runs/wan --out=runs/wan_diffusers \
        [--source=ema/decay_0p9999] [--step=N] [--dtype=bfloat16]

Import (`import_diffusers`) reads a diffusers `transformer/` directory into a VideoDiT
parameter tree (sora_jax.models.wan_import) and writes `OUT/checkpoints/0/state` (an Orbax
checkpoint holding `{'params': tree}`, which `python -m sora_jax.train --init_from=OUT`
reads through sora_jax.run.checkpoint.load_for_init), `OUT/model_config.json` (the resolved
`config.model` fields, the preset they match, and the data they need: latent channels and
text width) and `OUT/load_report.txt`. Export reads the parameters (`params` or an EMA copy,
`ema/<key>`) and model fields of a run's checkpoint or an import's output
(`load_run_params`) and writes `config.json` and `diffusion_pytorch_model*.safetensors`
that `WanTransformer3DModel.from_pretrained` loads (sora_jax.models.wan_export). A
two-expert run (Wan 2.2 A14B, `config.experts`) exports as a `WanPipeline` folder:
`transformer/` (high noise), `transformer_2/` (low noise) and `model_index.json` with the
run's `boundary_ratio` (`wan_export.export_two_experts`).

The flags are defined only when this module runs as the program, so the library functions
can be imported next to the other entry points (whose flags share names such as --step).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from tqdm import tqdm

from sora_jax.models import dit as dit_lib
from sora_jax.models import wan_export, wan_import
from sora_jax.models.safetensors_io import get_path, set_path
from sora_jax.run import checkpoint as ckpt_lib

MODEL_CONFIG_FILE = "model_config.json"
REPORT_FILE = "load_report.txt"
COMMANDS = ("import", "export")


def import_diffusers(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str | None = None,
    scan_layers: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Converts a diffusers Wan 2.1 transformer into an `--init_from` checkpoint at `out`.

    Returns the resolved model config written to `OUT/model_config.json`: `model` (the
    `config.model` entries: preset and explicit fields), `data` (latent channels and text
    width the training data must have), `flags` (the same as --config overrides),
    `num_params` and the `report` text.
    """
    # Resolve the preset first: a wrong --preset fails before anything is read.
    fields, shapes = wan_import.fields_from_diffusers(wan_import.read_diffusers_config(src))
    wan_import.resolve_model_config({**fields, "scan_layers": scan_layers}, preset)
    params, fields, shapes, report = wan_import.load_diffusers(
        src, scan_layers=scan_layers, progress=progress
    )
    model = wan_import.resolve_model_config(fields, preset)
    out = pathlib.Path(out)
    num_params = int(sum(x.size for x in jax.tree.leaves(params)))
    ckpt_lib.write_init_checkpoint(out, params)
    resolved = {
        "source": str(pathlib.Path(src).absolute()),
        "model": model,
        "data": {
            "latent_channels": shapes.out_channels,
            "cond_channels": shapes.in_channels - shapes.out_channels,
            "text_dim": shapes.text_dim,
        },
        "flags": wan_import.config_flags(model),
        "num_params": num_params,
        "report": str(report),
    }
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(resolved, indent=2) + "\n")
    (out / REPORT_FILE).write_text(str(report) + "\n")
    return resolved


def load_run_params(src: str | os.PathLike, source: str = "params", step: int | None = None):
    """`(params, model fields, description)` of a sora_jax checkpoint: a run workdir (its
    checkpoints/, or one checkpoints/<step>) or an `import_diffusers` output.

    The model fields come from the run's saved config (`checkpoints/<step>/config`, or the
    workdir's config.json) or from `model_config.json`; parameters are restored onto the
    first local device, shaped by the checkpoint's own metadata.
    """
    directory, found = ckpt_lib.resolve_checkpoint(src)
    step = found if step is None else step
    model_cfg = _saved_model_config(pathlib.Path(src), directory, step)
    fields = dit_lib.model_fields(model_cfg)
    saved = ckpt_lib.saved_shapes(directory, step, source)
    device = jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    abstract: dict = {}
    for name, shape in saved.items():
        leaf = jax.ShapeDtypeStruct(tuple(shape), jnp.float32, sharding=sharding)
        set_path(abstract, tuple(name.split("/")), leaf)
    wrapped: dict = {}
    set_path(wrapped, tuple(source.split("/")), abstract)
    restored, _ = ckpt_lib.restore_params(directory, wrapped, step)
    params = get_path(restored, tuple(source.split("/")))
    return params, fields, f"{directory}/{step} ({source})"


def _saved_model_config(src: pathlib.Path, directory: pathlib.Path, step: int) -> dict:
    """`config.model` of a checkpoint: saved with it, or the workdir's config.json, or the
    `model_config.json` of an import."""
    saved = ckpt_lib.saved_config(directory, step)
    if saved and "model" in saved:
        return saved["model"]
    for d in dict.fromkeys([src.expanduser().absolute(), directory.parent]):
        if (d / MODEL_CONFIG_FILE).is_file():
            return json.loads((d / MODEL_CONFIG_FILE).read_text())["model"]
        if (d / "config.json").is_file():
            cfg = json.loads((d / "config.json").read_text())
            if "model" in cfg:
                return cfg["model"]
    raise FileNotFoundError(
        f"no model config for {directory}/{step}: expected the checkpoint's saved config, "
        f"the run's config.json or an import's {MODEL_CONFIG_FILE}"
    )


# --- Command line -----------------------------------------------------------------------


def main(argv) -> None:
    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise SystemExit(
            f"error: give one command, {' or '.join(COMMANDS)}: python -m sora_jax.wan import "
            "--src=DIFFUSERS_DIR --out=DIR, or python -m sora_jax.wan export --src=RUN --out=DIR"
        )
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines drown the report
    if not f.src or not f.out:
        raise SystemExit("error: --src and --out are required")
    try:
        (_export if argv[1] == "export" else _import)(f)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        # Configuration and checkpoint problems: the message says what to fix.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _import(f) -> None:
    src_fields, shapes = wan_import.fields_from_diffusers(wan_import.read_diffusers_config(f.src))
    abstract = wan_import.abstract_params(src_fields, shapes)
    total = int(sum(x.size for x in jax.tree.leaves(abstract)))
    with tqdm(total=total, unit="param", unit_scale=True, desc="convert") as bar:
        resolved = import_diffusers(
            f.src, f.out, preset=f.preset, scan_layers=f.scan_layers, progress=bar.update
        )
    print(resolved["report"])
    print(f"wrote {f.out}/checkpoints/0 ({resolved['num_params']:,} params, float32)")
    print(f"model config ({f.out}/{MODEL_CONFIG_FILE}): {json.dumps(resolved['model'])}")
    print(f"data: {json.dumps(resolved['data'])}")
    flags_text = " ".join(resolved["flags"])
    print(f"train from it: python -m sora_jax.train ... --init_from={f.out} {flags_text}")


def saved_boundary_ratio(src: str | os.PathLike, step: int | None = None) -> float | None:
    """`experts.boundary_ratio` of a two-expert run's saved config (or config.json), or None."""
    directory, found = ckpt_lib.resolve_checkpoint(src)
    saved = ckpt_lib.saved_config(directory, found if step is None else step) or {}
    if "experts" not in saved and (directory.parent / "config.json").is_file():
        saved = json.loads((directory.parent / "config.json").read_text())
    return (saved.get("experts") or {}).get("boundary_ratio")


def _export(f) -> None:
    params, fields, where = load_run_params(f.src, f.source, f.step)
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    two = set(params) == {"high", "low"}  # Wan 2.2 A14B: a WanPipeline folder
    ratio = f.boundary_ratio
    if two and ratio is None:
        ratio = saved_boundary_ratio(f.src, f.step)
        if ratio is None:
            raise ValueError(
                f"{where} holds two experts but no experts.boundary_ratio was saved with it: "
                "pass --boundary_ratio (0.875 for T2V-A14B, 0.9 for I2V-A14B)"
            )
    with tqdm(total=total, unit="param", unit_scale=True, desc="export") as bar:
        if two:
            config = wan_export.export_two_experts(
                params, fields, f.out, boundary_ratio=ratio, dtype=f.dtype, progress=bar.update
            )
            print(f"{where} -> {f.out}/transformer, transformer_2 ({total:,} params, {f.dtype})")
            print(json.dumps(config, indent=2, sort_keys=True))
            print(f"load with: WanPipeline.from_pretrained({str(f.out)!r}, vae=..., ...)")
            return
        config = wan_export.export_diffusers(
            params, fields, f.out, dtype=f.dtype, progress=bar.update
        )
    print(f"{where} -> {f.out} ({total:,} params, {f.dtype})")
    print(json.dumps(config, indent=2, sort_keys=True))
    print(f"load with: WanTransformer3DModel.from_pretrained({str(f.out)!r})")


def define_flags() -> None:
    flags.DEFINE_string(
        "src",
        None,
        "Import: a diffusers Wan transformer/ folder. Export: a "
        "run workdir, checkpoints/<step>, or an import output.",
    )
    flags.DEFINE_string("out", None, "Output directory (import: the --init_from checkpoint).")
    flags.DEFINE_string(
        "preset",
        None,
        "Import: the dit.PRESETS entry the checkpoint must "
        "match (default: the matching wan2_1_* preset, if any).",
    )
    flags.DEFINE_bool(
        "scan_layers",
        True,
        "Import: stack the blocks (must equal the training "
        "config's model.scan_layers; experiments/wan.py scans).",
    )
    flags.DEFINE_string("source", "params", "Export: 'params' or 'ema/<key>' (decay_0p9999).")
    flags.DEFINE_integer("step", None, "Export: checkpoint step (default: the latest).")
    flags.DEFINE_enum("dtype", "float32", list(wan_export.EXPORT_DTYPES), "Export: tensor dtype.")
    flags.DEFINE_float(
        "boundary_ratio",
        None,
        "Export of a two-expert run: the pipeline's boundary_ratio (default: the run's "
        "experts.boundary_ratio).",
    )


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
