"""Exporting Wan 2.2 to the diffusers layout (sora_jax.models.wan_export; no PyTorch): an A14B
expert and TI2V-5B list exactly the published tensors (golden/wan22/shapes.json), and two
experts become a WanPipeline folder whose transformers are the tensors they came from.
That diffusers loads such a folder and reproduces sora_jax's outputs is checked by
scripts/check_wan22_export.py (its report: golden/wan22/export_report.json)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from sora_jax.models import dit as dit_lib
from sora_jax.models import wan_experts, wan_export
from sora_jax.models import wan_import as wan

GOLDEN = pathlib.Path(__file__).parent / "golden" / "wan22"


@pytest.mark.parametrize(
    ("doc_key", "preset", "scan"),
    [("a14b_expert", "wan2_2_a14b", True), ("ti2v_5b", "wan2_2_ti2v_5b", False)],
)
def test_export_of_a_full_size_model_lists_the_published_tensors(doc_key, preset, scan):
    doc = json.loads((GOLDEN / "shapes.json").read_text())[doc_key]
    fields, shapes = wan.fields_from_diffusers(doc["config"])
    built = dit_lib.model_fields({"preset": preset, "scan_layers": scan})
    abstract = wan.abstract_params(built, shapes)  # shapes only: nothing allocated
    entries, config = wan_export.export_plan(abstract, built)
    ours = {name: tuple(shape) for name, shape, _ in entries}
    published = {k: tuple(v) for k, v in doc["tensors"].items()}
    assert sorted(set(ours) ^ set(published)) == []
    assert {k: v for k, v in ours.items() if published[k] != v} == {}
    assert sum(int(np.prod(s)) for s in ours.values()) == doc["num_params"]
    assert {k: v for k, v in config.items() if k in doc["config"]} == {
        k: v for k, v in doc["config"].items() if k in config
    }
    assert set(doc["config"]) <= set(config)


def test_two_experts_export_as_a_wan_pipeline_folder(tmp_path):
    high, fields, shapes, _ = wan.load_diffusers(GOLDEN / "high")
    low, *_ = wan.load_diffusers(GOLDEN / "low")
    index = wan_export.export_two_experts(
        {"high": high, "low": low}, fields, tmp_path, boundary_ratio=0.875
    )
    saved = json.loads((tmp_path / "model_index.json").read_text())
    assert saved == index
    assert saved["_class_name"] == "WanPipeline" and saved["boundary_ratio"] == 0.875
    assert saved["transformer"] == saved["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    # transformer/ is the high-noise expert, transformer_2/ the low-noise one, tensor for tensor.
    for folder, want in (("transformer", "high"), ("transformer_2", "low")):
        names = sorted(p.name for p in (tmp_path / folder).iterdir())
        assert names == ["config.json", "diffusion_pytorch_model.safetensors"]
        back, back_fields, back_shapes, report = wan.load_diffusers(tmp_path / folder)
        assert back_shapes == shapes and back_fields == fields
        ref, *_ = wan.load_diffusers(GOLDEN / want)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a, b)
        ours = json.loads((tmp_path / folder / "config.json").read_text())
        theirs = json.loads((GOLDEN / want / "config.json").read_text())
        assert {k: ours[k] for k in ours if k in theirs} == {
            k: theirs[k] for k in ours if k in theirs
        }
    with pytest.raises(ValueError, match="boundary_ratio"):
        wan_export.export_two_experts(
            {"high": high, "low": low}, fields, tmp_path, boundary_ratio=1.2
        )
    with pytest.raises(ValueError, match="two-expert"):
        wan_export.export_two_experts({"high": high}, fields, tmp_path, boundary_ratio=0.875)
    assert wan_experts.EXPERT_NAMES == ("transformer", "transformer_2")
