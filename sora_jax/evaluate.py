r"""Evaluate a run's checkpoint with the evaluators of `config.evals` (each into
WORKDIR/eval/<step>/<name>.json, the files the trainer writes for them), or, for a config
without `evals`, with the one of `evaluate.type` (into WORKDIR/eval/<step>.json).

    python -m sora_jax.evaluate --config=experiments/demo.py --workdir=runs/demo
    python -m sora_jax.evaluate ... --config.evaluate.type=fvd \
        --config.evaluate.fvd_features=i3d --config.evaluate.fvd_weights=i3d_kinetics400.npz
    python -m sora_jax.evaluate --workdir=runs/videos --evals=val_loss,fd --step=2000
    python -m sora_jax.evaluate --import_i3d=rgb_imagenet.pt --i3d_out=i3d_k400.npz \
        [--i3d_layout=pytorch|tensorflow] [--i3d_bn_eps=0.001]

Without --config, the run's resolved WORKDIR/config.json is used. Each file holds the
numbers and the protocol that produced them.
Item evaluators (prompt_adherence, reconstruction, fvd) split their items over the
processes, keep per-item results under WORKDIR/eval/<step>/<type>/ and skip done items
when re-run (docs/sampling.md).
--import_i3d converts a published I3D checkpoint (PyTorch state dict or TensorFlow
variables) into the .npz that evaluate.fvd_weights names, with a load report
(sora_jax.evaluation.i3d_import, docs/evaluation.md); it needs no workdir.
"""

import json

from absl import flags

from sora_jax import entry
from sora_jax.evaluation import evaluators, generate, i3d_import
from sora_jax.evaluation import requests as requests_lib

STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
EVALS = flags.DEFINE_list(
    "evals", None, "Entries of config.evals to run (default: all; none: evaluate.type)."
)
CFG = flags.DEFINE_float("cfg", None, "Guidance scale (default: sample.cfg_scale).")
STEPS = flags.DEFINE_integer("steps", None, "ODE steps (default: sample.num_steps).")
PROCESS_INDEX = flags.DEFINE_integer(
    "eval_process_index", None, "This job's share of the items (default: jax.process_index())."
)
PROCESS_COUNT = flags.DEFINE_integer(
    "eval_process_count", None, "Jobs sharing the items (default: jax.process_count())."
)
IMPORT_I3D = flags.DEFINE_string(
    "import_i3d", None, "Convert this I3D checkpoint (.pt/.pth, .safetensors, .npz) and exit."
)
I3D_OUT = flags.DEFINE_string("i3d_out", None, "The .npz --import_i3d writes.")
I3D_LAYOUT = flags.DEFINE_enum(
    "i3d_layout", "auto", i3d_import.LAYOUTS, "Tensor names of --import_i3d (auto: detected)."
)
I3D_BN_EPS = flags.DEFINE_float(
    "i3d_bn_eps", None, "Batch-norm eps of the code the checkpoint ran with (default 1e-3)."
)


flags.adopt_module_key_flags(entry)  # --config and --workdir in --helpshort


def main(argv):
    del argv
    if IMPORT_I3D.value:
        import_i3d(IMPORT_I3D.value, I3D_OUT.value, I3D_LAYOUT.value, I3D_BN_EPS.value)
        return
    entry.require(entry.WORKDIR, "workdir")
    config = entry.loaded_config(from_workdir=True)
    s = config.sample
    options = requests_lib.SampleOptions.from_config(s, cfg_scale=CFG.value, num_steps=STEPS.value)
    names = EVALS.value or list(evaluators.named_evals(config))
    if EVALS.value and not evaluators.named_evals(config):
        raise ValueError(f"--evals={','.join(names)} but the config has no config.evals")
    kw = dict(
        step=STEP.value,
        ema_decay=s.ema_decay,
        process_index=PROCESS_INDEX.value,
        process_count=PROCESS_COUNT.value,
    )
    if not names:  # a config without `evals`: the evaluator of `evaluate.type`
        _print(evaluators.evaluate(config, entry.WORKDIR.value, options, **kw))
        return
    gen = None  # one restore of the checkpoint for every entry that samples or scores it
    for name in names:
        cfg = evaluators.entry_config(config, name)
        if gen is None and evaluators.needs_generator(cfg.evaluate.type):
            gen = generate.Generator.from_workdir(
                entry.WORKDIR.value, cfg, step=STEP.value, ema_decay=s.ema_decay
            )
        report = evaluators.evaluate(
            config, entry.WORKDIR.value, options, generator=gen, name=name, **kw
        )
        _print(report)


def import_i3d(src: str, out: str | None, layout: str, bn_eps: float | None) -> None:
    if not out:
        raise ValueError("--import_i3d needs --i3d_out=PATH.npz: where to write the weights")
    path, report = i3d_import.import_weights(src, out, layout=layout, bn_eps=bn_eps)
    print(report)
    print(
        f"wrote {path}: use --config.evaluate.fvd_features=i3d --config.evaluate.fvd_weights={path}"
    )


def _print(report) -> None:
    if "scores" not in report:
        print(
            json.dumps(
                {
                    "name": report.get("name", report["type"]),
                    "step": report["checkpoint_step"],
                    "computed": report.get("computed", 0),
                    "missing": len(report.get("missing", [])),
                    "items_dir": report.get("items_dir", ""),
                }
            )
        )
        return
    scores = {k: v for k, v in report["scores"].items() if not isinstance(v, list)}
    print(json.dumps({"path": report["path"], "step": report["checkpoint_step"], **scores}))


def run():
    entry.run_main(main)


if __name__ == "__main__":
    run()
