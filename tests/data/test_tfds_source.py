"""The TFDS source on a tiny dataset prepared locally in the array_record format. Runs
where tensorflow-datasets is installed (it is optional: `pip install tensorflow-datasets`)."""

import pathlib

import grain
import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.data import records, tokenization

tfds = pytest.importorskip("tensorflow_datasets", reason="pip install -e '.[tfds]'")
ROOT = pathlib.Path(__file__).resolve().parents[2]


class TinyActions(tfds.core.GeneratorBasedBuilder):
    """Six grey clips of 6 to 11 frames at 20x36, labelled 'wave' or 'jump'."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "video": tfds.features.Tensor(shape=(None, 20, 36, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["wave", "jump"]),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            yield i, {"video": np.full((6 + i, 20, 36, 1), 20 * i, np.uint8), "label": i % 2}


def test_tfds_examples_become_clips_with_template_captions(tmp_path):
    TinyActions(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    c = config_lib.load_config(f"{ROOT}/experiments/videos.py:tiny,folder=/unused")
    with c.unlocked():
        c.data.source = config_lib.ConfigDict(
            dict(
                name="tfds", dataset="tiny_actions", split="train", data_dir=str(tmp_path / "tfds"),
                caption_template="a person doing {label}", video_key="video", fps=0.0,
                max_examples=0,
            )
        )  # fmt: skip
    c.data.dataset_dir = str(tmp_path / "data")
    # Every clip stays in the bucket it fits: no held-out split, no demotion of sparse buckets.
    c.data.tokenize.holdout_fraction = 0.0
    c.data.tokenize.min_bucket_clips = 0
    summary = tokenization.run(c, tmp_path, show_progress=False)
    assert summary["rejects"] == 0 and summary["source"]["num_inputs"] == 6
    # 36x20 is 16:9 -> the 24x40 buckets need upscaling (40 > 36): the square 16x16 ones fit;
    # 6-8 frames -> 5 frames, 9-11 -> ... still 5 (no 9-frame 16x16 bucket)
    assert summary["buckets"]["5x16x16"]["count"] == 6
    files = [str(tmp_path / "data" / f) for f in summary["buckets"]["5x16x16"]["files"]]
    source = grain.sources.ArrayRecordDataSource(files)
    recs = [records.decode_record(source[i]) for i in range(len(source))]
    # TFDS stores examples in its own (hashed) order: recover each clip's example from its
    # grey level 20 i
    seen = []
    for r in recs:
        assert r["latents"].shape == (5, 16, 16, 3)
        i = int(round((float(np.mean(r["latents"])) + 1) * 127.5 / 20))
        np.testing.assert_allclose(r["latents"], 20 * i / 127.5 - 1, atol=2e-2)
        assert r["caption"] == f"a person doing {['wave', 'jump'][i % 2]}"
        seen.append(i)
    assert sorted(seen) == list(range(6))
