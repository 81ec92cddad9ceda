r"""Tokenize a dataset into bucketed ArrayRecord shards with a manifest.

    python -m sora_jax.tokenize --config=experiments/demo.py --workdir=runs/demo

Writes to `data.dataset_dir` (default WORKDIR/data): manifest.json, <bucket>/*.array_record,
rejects.jsonl. Re-running skips completed shards, so a killed job resumes where it stopped.
"""

import json

from absl import flags

from sora_jax import entry

BATCH = flags.DEFINE_integer("batch_size", 64, "Clips encoded per batch.")


flags.adopt_module_key_flags(entry)  # --config and --workdir in --helpshort


def main(argv):
    del argv
    entry.require(entry.WORKDIR, "workdir")
    config = entry.loaded_config()
    from sora_jax.data import tokenization

    manifest = tokenization.run(config, entry.WORKDIR.value, batch_size=BATCH.value)
    out = tokenization.dataset_dir(config, entry.WORKDIR.value)
    counts = {k: v["count"] for k, v in manifest["buckets"].items()}
    print(json.dumps({"dataset": str(out), "clips_per_bucket": counts, **manifest["stats"]}))


def run():
    entry.run_main(main)


if __name__ == "__main__":
    run()
