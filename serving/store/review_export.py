"""``abstain review export DIR``: the labelled review items as the next round's data.

The hardest inputs — those the model abstained on, labelled by people through
``POST /feedback`` — are written in a form ``abstain calibrate`` / ``abstain evaluate``
read with ``--data``:

* ``npz``: ``DIR/review.npz`` with ``x`` float32 ``[N, C, H, W]`` (the exact pixels the model
  saw) and ``y`` int64 ``[N]`` (class indices), plus ``request_id`` ``[N]``;
* ``imagefolder``: ``DIR/<class index>/<request id>.png`` (8-bit; torchvision's ImageFolder
  layout; as ``DIR/train`` of a ``--data-root`` it is also ``abstain train --dataset imagefolder``
  data).

Both are written to a temporary sibling and renamed into place, so ``DIR`` is never half
written. Items stay in the store (bounded by the review queue's limits).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from abstain.serving.store.decision_store import ReviewItem

FORMATS = ("npz", "imagefolder")
NPZ_NAME = "review.npz"


def item_pixels(item: ReviewItem) -> np.ndarray:
    """The stored input as float32 ``[C, H, W]`` in [0, 1]."""
    return np.frombuffer(item.pixels, dtype=np.float32).reshape(item.shape)


def to_png(x: np.ndarray) -> bytes:
    """Float ``[C, H, W]`` in [0, 1] → PNG bytes: grey for 1 channel, RGB for 3 (else the first)."""
    from PIL import Image

    pixels = np.clip(np.rint(np.asarray(x, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    image = (
        Image.fromarray(np.moveaxis(pixels, 0, -1)) if pixels.shape[0] == 3 else Image.fromarray(pixels[0])
    )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def select(items: Sequence[ReviewItem], model: str | None, version: str | None) -> list[ReviewItem]:
    """The items of one model version; refuses a mix (their inputs need not have one shape)."""
    chosen = [
        i for i in items if (model is None or i.model == model) and (version is None or i.version == version)
    ]
    kinds = sorted({(i.model, i.version) for i in chosen})
    if len(kinds) > 1:
        listed = ", ".join(f"{m}/{v}" for m, v in kinds)
        raise ValueError(
            f"labelled review items of several model versions ({listed}); choose one with --model/--version"
        )
    if not chosen:
        raise ValueError(
            "no labelled review items" + (f" for {model or '*'}/{version or '*'}" if model or version else "")
            + ": label abstentions listed by GET /review through POST /feedback first"
        )  # fmt: skip
    return chosen


def export(items: Sequence[ReviewItem], directory: Path, fmt: str) -> Path:
    """Write ``items`` (labelled, one model version) to ``directory`` in ``fmt``; returns what was written."""
    if fmt not in FORMATS:
        raise ValueError(f"format should be one of {', '.join(FORMATS)}, but got {fmt!r}")
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; give a new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        if fmt == "npz":
            x = np.stack([item_pixels(i) for i in items])  # [N, C, H, W]
            y = np.asarray([i.label for i in items], dtype=np.int64)  # [N]
            np.savez(tmp / NPZ_NAME, x=x, y=y, request_id=np.asarray([i.request_id for i in items]))
        else:
            for item in items:
                folder = tmp / str(item.label)
                folder.mkdir(exist_ok=True)
                (folder / f"{item.request_id}.png").write_bytes(to_png(item_pixels(item)))
        if directory.exists():
            directory.rmdir()  # empty (checked above)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory / NPZ_NAME if fmt == "npz" else directory
