"""The end-to-end demo behind `make demo`: tokenize → train → sample → evaluate.

    python -m sora_jax.demo --workdir=runs/demo [--config=experiments/demo.py]

Each stage is the library function of its entry point (sora_jax.{tokenize,train,sample,
evaluate}); the printed commands run the same stages one by one. Re-running resumes:
finished shards and the final checkpoint are reused.
"""

import json
import pathlib
import sys
import time

import jax
from absl import app, flags, logging

from sora_jax import config as config_lib
from sora_jax.data import tokenization
from sora_jax.evaluation import evaluators, generate
from sora_jax.evaluation import requests as requests_lib
from sora_jax.run import validate as validate_lib
from sora_jax.training import loop

WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where everything goes.")
CONFIG = flags.DEFINE_string("config", "experiments/demo.py", "Experiment file[:arg].")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO logs only with --verbosity=0
    workdir = pathlib.Path(WORKDIR.value)
    spec = CONFIG.value
    config = config_lib.load_config(spec)
    validate_lib.validate(config)
    config_lib.write_run_files(workdir, config, sys.argv)
    py = "python -m sora_jax"
    args = f"--config={spec} --workdir={workdir}"
    print(f"sora_jax demo in {workdir} on {jax.device_count()} {jax.default_backend()} devices")
    times = {}

    print(f"\n[1/4] tokenize   ({py}.tokenize {args})", flush=True)
    t0 = time.perf_counter()
    manifest = tokenization.run(config, workdir)
    times["tokenize"] = time.perf_counter() - t0

    print(f"\n[2/4] train      ({py}.train {args})", flush=True)
    t0 = time.perf_counter()
    summary = loop.train(config, workdir)
    times["train"] = time.perf_counter() - t0

    s = config.sample
    options = requests_lib.SampleOptions.from_config(s)
    print(f"\n[3/4] sample     ({py}.sample {args})", flush=True)
    t0 = time.perf_counter()
    gen = generate.Generator.from_workdir(workdir, config, ema_decay=s.ema_decay)
    samples = generate.sample_to_dir(config, workdir, list(s.prompts), options, generator=gen)
    times["sample"] = time.perf_counter() - t0

    print(f"\n[4/4] evaluate   ({py}.evaluate {args})", flush=True)
    t0 = time.perf_counter()
    report = evaluators.evaluate(config, workdir, options, generator=gen)
    times["evaluate"] = time.perf_counter() - t0

    scores = report["scores"]
    print("\n=== demo summary ===")
    print(
        f"dataset      {tokenization.dataset_dir(config, workdir)} "
        f"({sum(b['count'] for b in manifest['buckets'].values())} clips)"
    )
    print(
        f"checkpoint   {summary['checkpoint']} (step {summary['final_step']}, "
        f"{summary['parameters']:,} parameters)"
    )
    print(f"final loss   {summary['final_loss']:.4f}  (metrics: {workdir / 'metrics.jsonl'})")
    print(f"samples      {samples['output']}")
    for v in samples["videos"]:
        print(f"             {v}")
    print(
        f"adherence    colour {scores['colour']:.2f} (chance {scores['chance_colour']:.2f}), "
        f"direction {scores['direction']:.2f} (chance {scores['chance_direction']:.2f}), "
        f"both {scores['both']:.2f} (chance {scores['chance_both']:.3f}), "
        f"shape {scores['shape']:.2f} (chance {scores['chance_shape']:.2f}), "
        f"speed {scores['speed']:.2f} (chance {scores['chance_speed']:.2f}), "
        f"all four {scores['all']:.2f} (chance {scores['chance_all']:.3f}) "
        f"over {scores['n']} videos -> {report['path']}"
    )
    print("time (s)     " + json.dumps({k: round(v, 1) for k, v in times.items()}))


if __name__ == "__main__":
    app.run(main)
