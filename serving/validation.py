"""Request checking: JSON arrays and image uploads → a float32 batch ``[N, C, H, W]``, or a
:class:`InputRejectedError` that names the problem, what is valid, and the metrics reason.

:func:`fit_image` is the one image preprocessing of the serving side: ``/predict_image`` and
the image files of ``abstain calibrate`` / ``evaluate`` (:mod:`serving.data_sources`) both use
it, and for image-folder models it is training's eval transform.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

from abstain.contract import InputSpec
from abstain.datasets import imagefolder_resize_size

if TYPE_CHECKING:  # PIL is imported when an image is decoded, not with the module
    from PIL.Image import Image as PILImage

#: Largest upload ``/predict_image`` decodes (bytes) and largest decoded image (pixels): a
#: tiny compressed file can decode to gigabytes ("decompression bomb").
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
#: Pillow's formats accepted as PNG or JPEG. "MPO" is a JPEG with the MPF extension (most
#: phone cameras write one: the photo plus a preview frame); we use its first frame, the photo.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")
#: RGB graphs at least this many pixels a side were trained like ImageNet (``imagefolder``):
#: their images get the shorter side resized then a centre crop. Smaller graphs (digits 8×8,
#: Fashion-MNIST 28×28, CIFAR 32×32) were trained on whole arrays of their size: a direct resize.
CENTER_CROP_MIN_SIZE = 64


def uses_center_crop(spec: InputSpec) -> bool:
    """Whether :func:`fit_image` resizes the shorter side and centre-crops (:data:`CENTER_CROP_MIN_SIZE`)."""
    return spec.channels == 3 and min(spec.height, spec.width) >= CENTER_CROP_MIN_SIZE


def fit_image(image: PILImage, spec: InputSpec) -> np.ndarray:
    """A decoded PIL image → float32 ``[C, H, W]`` in [0, 1] for the graph's input spec.

    Converted to grey ``L`` (``C == 1``) or ``RGB`` (``C == 3``), then either

    * RGB graphs of at least :data:`CENTER_CROP_MIN_SIZE` pixels a side (image-folder models):
      shorter side to ``round(min(H, W) * 256 / 224)`` (bilinear, aspect kept, longer side
      truncated like torchvision), then the centre ``H × W`` crop — training's eval transform
      ``Resize(256) + CenterCrop(224)``, which on PIL images calls this same PIL resize;
    * smaller graphs: a direct bilinear resize to ``H × W`` (none when the size already matches).

    Intensity / 255, no inversion (255 → 1.0).
    """
    from PIL import Image

    image = image.convert("L" if spec.channels == 1 else "RGB")
    if uses_center_crop(spec):
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short = imagefolder_resize_size(min(spec.height, spec.width))
        new_long = int(new_short * long / short)  # torchvision's rounding (truncation)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        width, height = image.size
        top = round((height - spec.height) / 2.0)  # torchvision's
        left = round((width - spec.width) / 2.0)
        image = image.crop((left, top, left + spec.width, top + spec.height))
    elif image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0  # [H, W] or [H, W, 3]
    return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


class InputRejectedError(ValueError):
    """A request the service refuses; ``reason`` labels ``abstain_rejected_inputs_total``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _shape_text(spec: InputSpec) -> str:
    chw = f"{spec.channels}, {spec.height}, {spec.width}"
    return f"[{chw}] (one image) or [N, {chw}]"


def parse_pixels(raw: Any, spec: InputSpec, max_batch: int) -> np.ndarray:
    """Nested JSON lists → float32 ``[N, C, H, W]`` in [0, 1], ``1 <= N <= max_batch``.

    A single image ``[C, H, W]`` becomes a batch of one. Raises :class:`InputRejectedError` with
    reason ``empty_batch``, ``bad_shape``, ``bad_dtype``, ``batch_too_large``, ``non_finite``
    or ``out_of_range``.
    """
    valid = f"valid: float pixels in [0, 1] shaped {_shape_text(spec)}, at most {max_batch} images"
    if isinstance(raw, list | tuple) and len(raw) == 0:
        raise InputRejectedError("empty_batch", f"pixels is an empty array; {valid}")
    try:
        x = np.asarray(raw)
    except (ValueError, TypeError):  # ragged nesting
        raise InputRejectedError(
            "bad_shape", f"pixels is a ragged (non-rectangular) array; {valid}"
        ) from None
    if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputRejectedError(
            "bad_dtype",
            f"pixels should hold only numbers, but got {x.dtype.kind!r}-kind values ({x.dtype}); {valid}",
        )
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise InputRejectedError(
            "bad_shape", f"pixels should have 3 or 4 dimensions, but got shape {list(x.shape)}; {valid}"
        )
    if x.shape[0] == 0:
        raise InputRejectedError("empty_batch", f"pixels holds no image; {valid}")
    if x.shape[0] > max_batch:
        raise InputRejectedError(
            "batch_too_large",
            f"pixels holds {x.shape[0]} images, more than the limit {max_batch}; split the batch; {valid}",
        )
    if tuple(x.shape[1:]) != spec.shape:
        raise InputRejectedError("bad_shape", f"pixels has shape {list(x.shape)}; {valid}")
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(x, dtype=np.float32)  # [N, C, H, W]
    if not np.isfinite(x).all():
        raise InputRejectedError(
            "non_finite", f"pixels contains NaN or Inf (or a number too large for float32); {valid}"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InputRejectedError("out_of_range", f"pixels has values in [{lo:g}, {hi:g}]; {valid}")
    return x


def decode_image(data: bytes, spec: InputSpec) -> np.ndarray:
    """A PNG or JPEG file → float32 ``[1, C, H, W]`` in [0, 1] for the graph's input spec.

    Preprocessed by :func:`fit_image`. A JPEG with the MPF extension (Pillow's "MPO", from
    phone cameras) is a JPEG: its first frame is used. Raises :class:`InputRejectedError`
    (``bad_image``) for anything that is not a complete PNG/JPEG within the size limits.
    """
    from PIL import Image, UnidentifiedImageError

    valid = (
        f"valid: a complete PNG or JPEG file of at most {MAX_IMAGE_BYTES // (1024 * 1024)} MB "
        f"and {MAX_IMAGE_PIXELS} pixels"
    )
    if not data:
        raise InputRejectedError("bad_image", f"the upload is empty; {valid}")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputRejectedError("bad_image", f"the upload has {len(data)} bytes; {valid}")
    if spec.channels not in (1, 3):
        raise InputRejectedError(
            "bad_image", f"image upload supports 1- or 3-channel models, this one has {spec.channels}"
        )
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                raise InputRejectedError("bad_image", f"the upload is a {img.format} image; {valid}")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputRejectedError("bad_image", f"the image is {img.width}x{img.height}; {valid}")
            if img.format == "MPO":
                img.seek(0)  # the primary image; later frames are previews / other views
            img.load()  # decodes fully: a truncated file fails here
            x = fit_image(img, spec)  # [C, H, W]
    except InputRejectedError:
        raise
    except UnidentifiedImageError:
        # Pillow's message names an internal BytesIO object; say what it means instead
        raise InputRejectedError(
            "bad_image", f"the upload is not a readable image (unknown image format); {valid}"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputRejectedError(
            "bad_image", f"the upload is not a readable image ({exc}); {valid}"
        ) from None
    return x[None]  # [1, C, H, W]
