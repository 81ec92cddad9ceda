r"""Tokenize a dataset into bucketed ArrayRecord shards, or inspect a tokenized one.

    python -m sora_jax.tokenize --config=experiments/videos.py:folder=/data/clips \
        --workdir=runs/videos [--part=0/4]
    python -m sora_jax.tokenize --mode=inspect --dataset=runs/videos/data

`--mode=run` (default) writes to `data.dataset_dir` (default WORKDIR/data): per-bucket
shards, manifest.json, rejects.jsonl (docs/tokenize.md). Re-running skips finished work, so
a killed job resumes where it stopped. `--part=I/N` runs the I-th of N independent
processes over one dataset (e.g. a SLURM array); under `jax.distributed` the process index
and count are used instead. The job exits 1 when more than
`data.tokenize.max_reject_fraction` of the inputs were rejected.

`--mode=inspect` prints the dataset's bucket histogram, clip statistics and rejects by
reason, and writes a few records per bucket decoded back through the tokenizer as GIF and
PNG previews into --output (default DATASET/inspect).
"""

import json
import sys

from absl import flags

from sora_jax import entry
from sora_jax.data import previews, tokenization

MODE = flags.DEFINE_enum("mode", "run", ["run", "inspect"], "Tokenize, or inspect a dataset.")
BATCH = flags.DEFINE_integer("batch_size", 16, "Clips encoded per batch.")
PART = flags.DEFINE_string("part", None, "I/N: this process's part of the inputs.")
DATASET = flags.DEFINE_string("dataset", None, "--mode=inspect: the tokenized dataset dir.")
PREVIEWS = flags.DEFINE_integer("previews", 4, "--mode=inspect: records decoded per bucket.")
OUTPUT = flags.DEFINE_string("output", None, "--mode=inspect: previews dir (DATASET/inspect).")


flags.adopt_module_key_flags(entry)  # --config and --workdir in --helpshort


def parse_part(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8), checked."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part={text!r} must be I/N, e.g. --part=0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--part={text!r}: need N >= 1 and 0 <= I < N")
    return i, n


def main(argv):
    del argv
    if MODE.value == "inspect":
        if not DATASET.value:
            print(
                "error: --mode=inspect needs --dataset=DIR (a tokenized dataset)", file=sys.stderr
            )
            sys.exit(2)
        config = entry.CONFIG.value  # optional: its tokenizer decodes the previews
        report = previews.inspect(
            DATASET.value, output=OUTPUT.value, per_bucket=PREVIEWS.value, config=config
        )
        print(previews.format_report(report))
        return
    entry.require(entry.WORKDIR, "workdir")
    config = entry.loaded_config()
    index = count = None
    if PART.value:
        try:
            index, count = parse_part(PART.value)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    try:
        summary = tokenization.run(
            config,
            entry.WORKDIR.value,
            process_index=index,
            process_count=count,
            batch_size=BATCH.value,
        )
    except tokenization.RejectLimitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(tokenization.format_summary(summary))
    out = tokenization.dataset_dir(config, entry.WORKDIR.value)
    print(json.dumps({"dataset": str(out), **summary["stats"]}))


def run():
    entry.run_main(main)


if __name__ == "__main__":
    run()
