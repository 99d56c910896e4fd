"""Image uploads: MPO (phone-camera JPEG) accepted, one preprocessing with calibration's image files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from abstain.calibration.data_sources import image_to_pixels
from abstain.contract import InputSpec
from abstain.serving.http.validation import decode_image

RGB = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def test_mpo_jpeg_is_decoded_from_its_first_frame() -> None:
    buf = io.BytesIO()
    first, preview = Image.new("RGB", (16, 12), (255, 0, 0)), Image.new("RGB", (16, 12), (0, 0, 255))
    first.save(buf, format="MPO", save_all=True, append_images=[preview])
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "MPO" and img.n_frames == 2
    x = decode_image(data, InputSpec(3, 12, 16, *RGB))
    assert x.shape == (1, 3, 12, 16)
    np.testing.assert_allclose(x[0, :, 6, 8], [1.0, 0.0, 0.0], atol=0.03)  # red, not the blue preview


def test_upload_and_calibration_file_are_preprocessed_alike(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(90, 130, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    for spec in (InputSpec(3, 64, 64, *RGB), InputSpec(1, 8, 8)):
        uploaded = decode_image((tmp_path / "a.png").read_bytes(), spec)
        np.testing.assert_array_equal(uploaded[0], image_to_pixels(tmp_path / "a.png", spec))
