"""The one image preprocessing shared by calibration (image files) and serving (uploads).

:func:`fit_image` turns a decoded PIL image into float32 ``[C, H, W]`` in [0, 1] for a graph's
input spec; for image-folder models it is training's eval transform. PIL is imported when an
image is converted, not with the module, so the core stays numpy-only at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from abstain.contract import InputSpec
from abstain.datasets import imagefolder_resize_size

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

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
