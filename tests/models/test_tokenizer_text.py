"""The pixels tokenizer and the hash-words text encoder."""

import numpy as np
import pytest

from sora_jax.models import text, tokenizer


@pytest.mark.parametrize("s", [1, 2, 4])
def test_pixels_round_trip_and_layout(s):
    tok = tokenizer.PixelTokenizer(s)
    video = np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 12, 3)).astype(np.float32)
    latents = tok.encode(video)
    assert latents.shape == (2, *tok.latent_shape(3, 8, 12))
    np.testing.assert_array_equal(tok.decode(latents), video)
    # Latent pixel (i, j) holds exactly the s x s block at (i s, j s).
    block = video[:, :, s : 2 * s, :s, :].reshape(2, 3, -1) if s > 1 else video[:, :, 1:2, :1]
    np.testing.assert_array_equal(
        np.sort(latents[:, :, 1, 0].reshape(2, 3, -1)), np.sort(block.reshape(2, 3, -1))
    )


def test_pixels_rejects_indivisible_size():
    with pytest.raises(ValueError, match="space_to_depth=4"):
        tokenizer.PixelTokenizer(4).latent_shape(1, 30, 32)


def test_hash_words_deterministic_masked_and_distinct():
    enc = text.HashWordsEncoder(dim=16, max_length=6)
    a, mask = enc.encode(["a red square", "a blue square", ""])
    b, _ = text.HashWordsEncoder(dim=16, max_length=6).encode(["a red square"])
    np.testing.assert_array_equal(a[0], b[0])
    assert mask.tolist()[0] == [True] * 3 + [False] * 3
    assert not mask[2].any() and not a[2].any()
    assert not np.allclose(a[0, 1], a[1, 1])  # 'red' vs 'blue'
    np.testing.assert_array_equal(a[0, 2], a[1, 2])  # 'square' at the same position
    assert enc.manifest_entry()["hash"] != text.HashWordsEncoder(dim=32).manifest_entry()["hash"]
