"""MetricsWriter: scalars to metrics.jsonl and TensorBoard, images (sample contact sheets)
to TensorBoard, read back from the event file."""

import numpy as np

from sora_jax.training import metrics as metrics_lib


def test_images_go_to_tensorboard_and_scalars_to_both(tmp_path):
    writer = metrics_lib.MetricsWriter(tmp_path)
    sheet = np.zeros((20, 34, 3), np.uint8)
    sheet[:, :10, 0] = 255  # a red column: the image is not blank
    writer.write(5, {"eval/loss": 0.5, "eval/samples": sheet})
    writer.write(6, {"eval/loss": 0.25})
    writer.close()
    rows = metrics_lib.read_metrics(tmp_path)
    # The image is not a metrics.jsonl number.
    assert rows == [{"step": 5, "eval/loss": 0.5}, {"step": 6, "eval/loss": 0.25}]
    tags = metrics_lib.read_tensorboard(tmp_path)
    assert [(s, v.simple_value) for s, v in tags["eval/loss"]] == [(5, 0.5), (6, 0.25)]
    ((step, image),) = tags["eval/samples"]
    assert step == 5 and (image.image.height, image.image.width) == (20, 34)
    assert image.image.encoded_image_string.startswith(b"\x89PNG")
