"""Request checking: JSON arrays and image uploads → a float32 batch ``[N, C, H, W]``, or a
:class:`InputRejectedError` that names the problem, what is valid, and the metrics reason.

Images are converted by :func:`abstain.images.fit_image`, the one image preprocessing that
``/predict_image`` and the image files of ``abstain calibrate`` / ``evaluate`` share.
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING, Any

import numpy as np

from abstain.contract import InputSpec
from abstain.images import fit_image

if TYPE_CHECKING:
    from abstain.serving.metrics import RejectReason

#: Largest upload ``/predict_image`` decodes (bytes) and largest decoded image (pixels): a
#: tiny compressed file can decode to gigabytes ("decompression bomb").
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
#: Pillow's formats accepted as PNG or JPEG. "MPO" is a JPEG with the MPF extension (most
#: phone cameras write one: the photo plus a preview frame); we use its first frame, the photo.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO")


class InputRejectedError(ValueError):
    """A request the service refuses; ``reason`` labels ``abstain_rejected_inputs_total``."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _shape_text(spec: InputSpec) -> str:
    chw = f"{spec.channels}, {spec.height}, {spec.width}"
    return f"[{chw}] (one image) or [N, {chw}]"


def _valid_text(spec: InputSpec, max_batch: int) -> str:
    return f"valid: float pixels in [0, 1] shaped {_shape_text(spec)}, at most {max_batch} images"


def _check_shape(shape: tuple[int, ...], spec: InputSpec, max_batch: int, valid: str) -> tuple[int, ...]:
    """``shape`` as ``(N, C, H, W)`` (a ``[C, H, W]`` image is a batch of one), or a rejection."""
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise InputRejectedError(
            "bad_shape", f"pixels should have 3 or 4 dimensions, but got shape {list(shape)}; {valid}"
        )
    if shape[0] == 0:
        raise InputRejectedError("empty_batch", f"pixels holds no image; {valid}")
    if shape[0] > max_batch:
        raise InputRejectedError(
            "batch_too_large",
            f"pixels holds {shape[0]} images, more than the limit {max_batch}; split the batch; {valid}",
        )
    if tuple(shape[1:]) != spec.shape:
        raise InputRejectedError("bad_shape", f"pixels has shape {list(shape)}; {valid}")
    return shape


def _check_values(x: np.ndarray, valid: str) -> np.ndarray:
    """Refuse NaN/Inf and pixels outside [0, 1] of a float32 batch; return it."""
    # min and max propagate NaN, so two reductions check both finiteness and range (no temporaries)
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputRejectedError(
            "non_finite", f"pixels contains NaN or Inf (or a number too large for float32); {valid}"
        )
    if lo < 0.0 or hi > 1.0:
        raise InputRejectedError("out_of_range", f"pixels has values in [{lo:g}, {hi:g}]; {valid}")
    return x


def check_pixel_values(x: np.ndarray, spec: InputSpec, max_batch: int) -> np.ndarray:
    """Refuse NaN/Inf and pixels outside [0, 1] of a float32 batch whose shape is already checked
    (binary tensor data: a ``.npy`` body, the Open Inference Protocol's binary extension)."""
    return _check_values(x, _valid_text(spec, max_batch))


def batch_length(raw: Any) -> int:
    """``len(raw)`` when ``raw`` looks like a batch ``[N, C, H, W]`` of nested lists, else 0."""
    try:
        return len(raw) if isinstance(raw[0][0][0], list | tuple) else 0
    except (TypeError, IndexError, KeyError):
        return 0


def _as_array(raw: Any) -> np.ndarray:
    """``np.asarray(raw)``, a batch converted one image at a time.

    Why: ``np.asarray`` over a whole batch of nested lists is one C call that holds the GIL
    throughout, so even on a worker thread it stalls the
    event loop, ``/livez`` included. Between images the GIL passes (tests/serving/test_event_loop.py).
    Mixed int and float images give the same dtype as one ``np.asarray`` would.
    """
    n = batch_length(raw)
    if n < 2:
        return np.asarray(raw)
    images = [np.asarray(image) for image in raw]
    if len({image.shape for image in images}) != 1:
        raise ValueError("images of different shapes")
    return np.stack(images)


def parse_pixels(raw: Any, spec: InputSpec, max_batch: int) -> np.ndarray:
    """Nested JSON lists → float32 ``[N, C, H, W]`` in [0, 1], ``1 <= N <= max_batch``.

    A single image ``[C, H, W]`` becomes a batch of one. Raises :class:`InputRejectedError` with
    reason ``empty_batch``, ``bad_shape``, ``bad_dtype``, ``batch_too_large``, ``non_finite``
    or ``out_of_range``.
    """
    valid = _valid_text(spec, max_batch)
    if isinstance(raw, list | tuple) and len(raw) == 0:
        raise InputRejectedError("empty_batch", f"pixels is an empty array; {valid}")
    if batch_length(raw) > max_batch:  # before np.asarray copies a body we would refuse anyway
        _check_shape((len(raw), *spec.shape), spec, max_batch, valid)
    try:
        x = _as_array(raw)
    except (ValueError, TypeError):  # ragged nesting
        raise InputRejectedError(
            "bad_shape", f"pixels is a ragged (non-rectangular) array; {valid}"
        ) from None
    if x.dtype == object or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputRejectedError(
            "bad_dtype",
            f"pixels should hold only numbers, but got {x.dtype.kind!r}-kind values ({x.dtype}); {valid}",
        )
    shape = _check_shape(x.shape, spec, max_batch, valid)
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(x.reshape(shape), dtype=np.float32)  # [N, C, H, W]
    return _check_values(x, valid)


#: ``Content-Type`` of a ``.npy`` body for ``POST /predict``.
NPY_MEDIA_TYPE = "application/x-npy"


def parse_npy(data: bytes, spec: InputSpec, max_batch: int) -> np.ndarray:
    """A ``.npy`` file (``np.save``) → float32 ``[N, C, H, W]`` in [0, 1], ``1 <= N <= max_batch``.

    Accepted: float32 pixels in [0, 1], or uint8 pixels 0–255 (divided by 255), shaped
    ``[C, H, W]`` or ``[N, C, H, W]``, either byte order, C or Fortran order. What
    ``np.load(allow_pickle=False)`` reads, read here from the header first: shape and dtype are
    checked before any pixel is touched, object arrays (pickles) are refused without
    unpickling, and the pixels are viewed in the request's bytes, not copied (one float32 copy
    is made, in the graph's layout). Raises :class:`InputRejectedError` with ``bad_npy`` for a
    body that is not a complete ``.npy`` file, ``bad_dtype`` for another dtype, and the
    reasons of :func:`parse_pixels` otherwise.
    """
    valid = _valid_text(spec, max_batch) + " (.npy: float32 in [0, 1] or uint8 0-255)"
    try:
        shape, fortran, dtype, offset = _npy_header(data[: _npy_header_end(data)])
    # numpy parses the header with ast.literal_eval: garbage raises ValueError, SyntaxError, or
    # tokenize.TokenError (not a SyntaxError), EOFError if short; all mean "not a .npy file"
    except Exception as exc:
        raise InputRejectedError(
            "bad_npy", f"the body is not a readable .npy file ({exc}); write it with numpy.save; {valid}"
        ) from None
    if dtype.hasobject or dtype.kind not in "fu" or dtype.itemsize != (4 if dtype.kind == "f" else 1):
        raise InputRejectedError("bad_dtype", f"the .npy array has dtype {dtype}; {valid}")
    nchw = _check_shape(tuple(shape), spec, max_batch, valid)
    count = int(np.prod(shape))
    if len(data) - offset != count * dtype.itemsize:
        raise InputRejectedError(
            "bad_npy",
            f"the .npy header announces {count * dtype.itemsize} bytes of pixels but the body has "
            f"{len(data) - offset} after it (truncated or padded); {valid}",
        )
    x = np.frombuffer(data, dtype=dtype, count=count, offset=offset)  # a view of the body
    x = x.reshape(shape, order="F" if fortran else "C")
    if dtype.kind == "u":  # uint8: scaled into [0, 1], always in range
        return np.divide(x.reshape(nchw), np.float32(255), dtype=np.float32)
    return _check_values(np.ascontiguousarray(x.reshape(nchw), dtype=np.float32), valid)


#: numpy's own bound on a ``.npy`` header (``np.load``'s ``max_header_size``): bigger is refused
MAX_NPY_HEADER = 10_000


def _npy_header_end(data: bytes) -> int:
    """Where the pixels of a ``.npy`` body start: the magic, the header length, the header.

    Only the length fields are read here; a body too short or not a ``.npy`` at all gives an
    end that :func:`_npy_header` then refuses with numpy's own message.
    """
    if data[6:8] == b"\x01\x00":  # format 1.0: a 2-byte little-endian header length
        return 10 + int.from_bytes(data[8:10], "little")
    if data[6:8] == b"\x02\x00":  # format 2.0: 4 bytes
        return 12 + min(int.from_bytes(data[8:12], "little"), MAX_NPY_HEADER + 1)
    return 10


@functools.lru_cache(maxsize=64)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """``(shape, fortran_order, dtype, pixel offset)`` of a ``.npy`` file's magic and header bytes.

    Cached: numpy parses the header's Python literal with ``ast.literal_eval`` (as long as the
    whole decision for a small image), and a client sends the same header with every
    request of one shape. Errors are not cached (``lru_cache`` keeps only results).
    """
    fp = io.BytesIO(prefix)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        # numpy's stubs lack max_header_size, which numpy >= 1.24 takes
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=MAX_NPY_HEADER)  # type: ignore[call-arg]
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=MAX_NPY_HEADER)  # type: ignore[call-arg]
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} (valid: 1.0 or 2.0)")
    if fp.read(1):  # numpy stops at the header's end: anything left is not header
        raise ValueError("the header length does not match the header")
    return tuple(shape), bool(fortran), dtype, len(prefix)


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
