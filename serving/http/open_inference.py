"""The Open Inference Protocol's tensors for ``abstain serve``: request → pixels, decisions → outputs.

The KServe / Triton "v2" protocol (kserve/open-inference-protocol, ``specification/protocol/
inference_rest.md``, "Inference Request JSON Object", "Tensor Data") with Triton's binary
tensor data extension (triton-inference-server/server ``docs/protocol/extension_binary_data.md``).
Only the codec lives here — bytes and JSON in, a checked float32 batch out; decisions in, a body
out — so that the REST routes (:mod:`abstain.serving.http.v2_routes`) and the gRPC service
(:mod:`abstain.serving.http.grpc_service`) map the same tensors with the same checks.

The one input is ``pixels``: ``FP32 [N, C, H, W]`` in [0, 1], or ``UINT8`` 0–255 (divided by
255, as a ``.npy`` body of ``/predict``), checked by
:func:`abstain.serving.http.validation.parse_pixels` (shape, NaN/Inf, range, batch limit) with
the reasons of ``/predict``. The outputs (:data:`OUTPUT_DATATYPES`), all ``[N]`` but ``logits``:

* ``logits`` FP32 ``[N, K]``, ``selection`` FP32, ``selection_logit`` FP32 (graphs that have it);
* the decision at the request's operating point, named and typed as in the selective graph of
  ``abstain export-selective`` (``export/selective_graph.py``): ``class_index`` INT64,
  ``confidence`` FP64, ``accept`` BOOL — here one column, the request's operating point, not the
  ``[N, P]`` of every point — and ``score`` FP64, the number ``accept`` compared with the
  threshold (the selective graph's ``scores`` column of that point);
* ``label`` BYTES, the class name of ``class_index`` (the prediction, or an abstention's
  candidate), and ``request_id`` BYTES, the id the decision store keeps (``POST /feedback``).

Request parameters: ``operating_point`` (string; default the service's) and
``binary_data_output`` (bool); a requested output's ``binary_data`` (bool). Request ids: with a
request ``id``, image ``i``'s is ``<id>-<i>``; without, the service makes them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from abstain.contract import INPUT_NAME, LOGITS_NAME, SELECTION_LOGIT_NAME, SELECTION_NAME
from abstain.serving.http.request_ids import REQUEST_ID, REQUEST_ID_TEXT
from abstain.serving.http.validation import InputRejectedError, check_pixel_values, parse_pixels

if TYPE_CHECKING:
    from abstain.contract import InputSpec
    from abstain.serving.http.contract import DecidedBatch

#: Every output the service can return, with its protocol datatype (``selection_logit`` only
#: when the graph has it). Names and dtypes of the decision follow ``export/selective_graph.py``.
OUTPUT_DATATYPES: dict[str, str] = {
    LOGITS_NAME: "FP32",
    SELECTION_NAME: "FP32",
    SELECTION_LOGIT_NAME: "FP32",
    "class_index": "INT64",
    "confidence": "FP64",
    "accept": "BOOL",
    "score": "FP64",
    "label": "BYTES",
    "request_id": "BYTES",
}


def available_outputs(graph_outputs: Sequence[str]) -> list[str]:
    """The outputs of :data:`OUTPUT_DATATYPES` a service whose graph returns ``graph_outputs``
    has (``selection_logit`` only with such a graph), in that order."""
    return [n for n in OUTPUT_DATATYPES if n != SELECTION_LOGIT_NAME or n in graph_outputs]


#: Input datatypes taken for ``pixels``, and the numpy dtype of their binary data (little-endian).
INPUT_DATATYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
#: The protocol extensions this server implements (``GET /v2``'s ``extensions``).
EXTENSIONS = ("binary_tensor_data", "parameters")
#: The header naming the length of the JSON part of a binary body (extension_binary_data.md).
HEADER_LENGTH = "inference-header-content-length"

VALID_REQUEST = (
    'valid: a JSON object {"id": "<id>" (optional), "parameters": {"operating_point": "<name>", '
    '"binary_data_output": true|false} (optional), "inputs": [{"name": "pixels", "datatype": '
    '"FP32" or "UINT8", "shape": [N, C, H, W], "data": [...] or "parameters": {"binary_data_size": '
    'bytes}}], "outputs": [{"name": "<output>", "parameters": {"binary_data": true|false}}] (optional)}'
)


def bad_request(message: str) -> InputRejectedError:
    """A request that does not follow the protocol: 400 ``bad_json``, naming what is valid."""
    return InputRejectedError("bad_json", f"{message}; {VALID_REQUEST}")


@dataclass(frozen=True)
class InferRequest:
    """A checked inference request: ``pixels`` float32 ``[N, C, H, W]`` in [0, 1], and what to answer.

    ``outputs``: ``(name, binary)`` per output in the order asked for; ``None``: every output,
    binary iff ``binary_data_output``. ``request_ids``: ``<id>-<i>`` per image when the request
    has an ``id``, else ``None`` (the service makes them).
    """

    pixels: np.ndarray
    id: str | None
    operating_point: str | None
    outputs: list[tuple[str, bool]] | None
    binary_data_output: bool
    request_ids: list[str] | None
    parameters: Mapping[str, Any] = field(default_factory=dict)


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    """A ``parameters`` object (``$parameters``: a JSON object of bool, number or string values)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad_request(f"{where} 'parameters' should be a JSON object, but got a {type(raw).__name__}")
    for key, value in raw.items():
        if not isinstance(value, bool | int | float | str):
            raise bad_request(
                f"{where} parameter {key!r} should be a bool, number or string, "
                f"but got a {type(value).__name__}"
            )
    return raw


def _flag(params: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{where} parameter {key!r} should be true or false, but got {value!r}")
    return value


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """The JSON header (decoded) and the binary part of a request body.

    ``header_length``: the ``Inference-Header-Content-Length`` header, if sent; without it the
    whole body is JSON (extension_binary_data.md, "HTTP/REST").
    """
    view = memoryview(body)
    if header_length is None:
        header, rest = view, view[len(view) :]
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise bad_request(
                f"Inference-Header-Content-Length is {header_length[:40]!r} for a body of {len(body)} bytes; "
                "it should be the byte length of the JSON header at the start of the body"
            )
        n = int(header_length)
        header, rest = view[:n], view[n:]
    try:
        return orjson.loads(header), rest
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request header is not valid JSON ({exc})") from None


def parse_infer_request(
    payload: Any,
    binary: memoryview,
    spec: InputSpec,
    max_json_batch: int,
    max_batch: int,
    outputs_available: Sequence[str],
) -> InferRequest:
    """An inference request (its decoded JSON ``payload`` and ``binary`` part) → :class:`InferRequest`.

    JSON tensor data may be nested or flat (inference_rest.md, "Tensor Data": row-major) and
    holds at most ``max_json_batch`` images; binary data at most ``max_batch``. Raises
    :class:`InputRejectedError`: ``bad_json`` for a request off the protocol (unknown fields'
    types, an unknown output, binary sizes that do not add up), else ``/predict``'s reasons.
    """
    if not isinstance(payload, dict):
        raise bad_request(f"the request should be a JSON object, but got a {type(payload).__name__}")
    params = _parameters(payload.get("parameters"), "request")
    operating_point = params.get("operating_point")
    if operating_point is not None and not isinstance(operating_point, str):
        raise bad_request(
            f"request parameter 'operating_point' should be a string, but got {operating_point!r}"
        )
    binary_output = bool(_flag(params, "binary_data_output", "request"))
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request(f"'id' should be a string, but got a {type(request_id).__name__}")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        got = f"{len(inputs)} inputs" if isinstance(inputs, list) else f"a {type(inputs).__name__}"
        raise bad_request(f"'inputs' should be a list of one tensor, {INPUT_NAME!r}, but got {got}")
    pixels = _pixels(inputs[0], binary, spec, max_json_batch, max_batch)
    outputs = _requested_outputs(payload.get("outputs"), outputs_available)
    return InferRequest(
        pixels=pixels,
        id=request_id,
        operating_point=operating_point,
        outputs=outputs,
        binary_data_output=binary_output,
        request_ids=None if request_id is None else image_request_ids(request_id, len(pixels)),
        parameters=params,
    )


def image_request_ids(request_id: str, n: int) -> list[str]:
    """``<id>-<i>`` for the ``n`` images of a request whose ``id`` is ``request_id``."""
    ids = [f"{request_id}-{i}" for i in range(n)]
    if not (REQUEST_ID.fullmatch(ids[0]) and REQUEST_ID.fullmatch(ids[-1])):
        raise InputRejectedError(
            "bad_request_id",
            f"the request id {request_id[:140]!r} does not make valid image request ids "
            f"({ids[0][:140]!r} ...); valid: an id such that '<id>-<image index>' is {REQUEST_ID_TEXT}",
        )
    return ids


def _shape(raw: Any, spec: InputSpec, limit: int, where: str) -> tuple[int, int, int, int]:
    chw = list(spec.shape)
    valid = f"valid: [N, {', '.join(map(str, chw))}] with 1 <= N <= {limit} ({where})"
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise InputRejectedError(
            "bad_shape", f"input {INPUT_NAME!r} 'shape' should be a list of integers; {valid}"
        )
    if len(raw) != 4 or raw[1:] != chw or raw[0] < 0:
        raise InputRejectedError("bad_shape", f"input {INPUT_NAME!r} has shape {raw[:8]}; {valid}")
    if raw[0] == 0:
        raise InputRejectedError("empty_batch", f"input {INPUT_NAME!r} holds no image; {valid}")
    if raw[0] > limit:
        raise InputRejectedError(
            "batch_too_large",
            f"input {INPUT_NAME!r} holds {raw[0]} images, more than {limit}; split the batch; {valid}",
        )
    return raw[0], raw[1], raw[2], raw[3]


def _valid_pixels(spec: InputSpec) -> str:
    chw = ", ".join(map(str, spec.shape))
    return (
        f"valid: input {INPUT_NAME!r} FP32 pixels in [0, 1] or UINT8 pixels 0-255, shape [N, {chw}], "
        "'data' a flat or nested array of that many numbers"
    )


def _pixels(
    tensor: dict[str, Any], binary: memoryview, spec: InputSpec, max_json_batch: int, max_batch: int
) -> np.ndarray:
    """The ``pixels`` input tensor → float32 ``[N, C, H, W]`` in [0, 1], checked as ``/predict`` does."""
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if name != INPUT_NAME:
        raise bad_request(
            f"the model's one input is {INPUT_NAME!r}, but got an input named {str(name)[:64]!r}"
        )
    if datatype not in INPUT_DATATYPES:
        raise InputRejectedError(
            "bad_dtype",
            f"input {INPUT_NAME!r} has datatype {str(datatype)[:16]!r}; valid: FP32 pixels in [0, 1] "
            "or UINT8 pixels 0-255",
        )
    params = _parameters(tensor.get("parameters"), f"input {INPUT_NAME!r}")
    size = params.get("binary_data_size")
    dtype = INPUT_DATATYPES[datatype]
    if size is None:  # JSON tensor data
        if len(binary):
            raise bad_request(
                f"the body has {len(binary)} bytes after the JSON header but no input has binary data"
            )
        if "data" not in tensor:
            raise bad_request(f"input {INPUT_NAME!r} has neither 'data' nor a 'binary_data_size' parameter")
        shape = _shape(tensor.get("shape"), spec, max_json_batch, "JSON tensor data")
        try:
            values = np.asarray(tensor["data"])
        except (ValueError, TypeError):  # ragged nesting
            raise InputRejectedError(
                "bad_shape", f"input {INPUT_NAME!r} 'data' is a ragged array; {_valid_pixels(spec)}"
            ) from None
        if values.dtype == object or values.dtype.kind not in "iuf":
            raise InputRejectedError(
                "bad_dtype",
                f"input {INPUT_NAME!r} 'data' should hold only numbers, but got {values.dtype}; "
                f"{_valid_pixels(spec)}",
            )
        if datatype == "UINT8" and (
            values.dtype.kind == "f" or (values.size and (values.min() < 0 or values.max() > 255))
        ):
            raise InputRejectedError(
                "bad_dtype",
                f"input {INPUT_NAME!r} is UINT8, so 'data' should hold integers 0-255; {_valid_pixels(spec)}",
            )
    else:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad_request(
                f"input {INPUT_NAME!r} 'binary_data_size' should be a byte count, but got {size!r}"
            )
        if "data" in tensor:
            raise bad_request(f"input {INPUT_NAME!r} has both 'data' and a 'binary_data_size' parameter")
        shape = _shape(tensor.get("shape"), spec, max_batch, "binary tensor data")
        need = math.prod(shape) * dtype.itemsize
        if size != need or len(binary) != size:
            raise bad_request(
                f"input {INPUT_NAME!r} {datatype} {list(shape)} needs {need} bytes of binary data, but its "
                f"'binary_data_size' is {size} and the body has {len(binary)} bytes after the JSON header"
            )
        values = np.frombuffer(binary, dtype=dtype)  # a view of the body, no copy
    if values.size != math.prod(shape):
        raise InputRejectedError(
            "bad_shape",
            f"input {INPUT_NAME!r} declares shape {list(shape)} ({math.prod(shape)} values) but its data "
            f"has {values.size}; {_valid_pixels(spec)}",
        )
    x = values.reshape(shape)
    if datatype == "UINT8":  # 0-255 scaled into [0, 1], as /predict's uint8 .npy bodies
        x = np.divide(x, np.float32(255), dtype=np.float32)
    if size is not None:
        # binary data has its dtype and shape checked above, as a .npy body's: only the values
        # are left (NaN/Inf, range), checked as /predict's .npy path does — not the list parser
        return check_pixel_values(np.ascontiguousarray(x, dtype=np.float32), spec, max_batch)
    # JSON data: the checks of /predict: dtype, shape, NaN/Inf, range, batch limit (its messages)
    return parse_pixels(x, spec, max_batch)


def _requested_outputs(raw: Any, available: Sequence[str]) -> list[tuple[str, bool]] | None:
    """``outputs`` of the request → ``(name, binary)`` in its order; ``None`` when absent (all)."""
    if raw is None:
        return None
    valid = f"valid outputs: {', '.join(available)}"
    if not isinstance(raw, list):
        raise bad_request(f"'outputs' should be a list, but got a {type(raw).__name__}")
    seen: list[tuple[str, bool]] = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request(f"each requested output should be an object with a 'name'; {valid}")
        name = item["name"]
        if name not in available:
            raise bad_request(f"unknown output {name[:64]!r}; {valid}")
        if any(name == n for n, _ in seen):
            raise bad_request(f"output {name!r} is requested twice")
        params = _parameters(item.get("parameters"), f"output {name!r}")
        if params.get("classification"):
            raise bad_request(
                "the classification extension is not supported: ask for 'label' and 'confidence'"
            )
        seen.append((name, bool(_flag(params, "binary_data", f"output {name!r}"))))
    return seen


def output_arrays(decided: DecidedBatch, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Every output of :data:`OUTPUT_DATATYPES` the batch has, as arrays in their datatype."""
    d, out = decided.decisions, decided.outputs
    arrays: dict[str, np.ndarray] = {
        LOGITS_NAME: np.asarray(out.logits, dtype=np.float32),
        SELECTION_NAME: np.asarray(out.selection, dtype=np.float32).reshape(-1),
        "class_index": d.class_index.astype(np.int64),
        "confidence": d.confidence.astype(np.float64),
        "accept": d.answered.astype(np.bool_),
        "score": d.score_value.astype(np.float64),
        "label": np.array([class_names[k] for k in d.class_index.tolist()], dtype=object),
        "request_id": np.array(decided.request_ids, dtype=object),
    }
    z = getattr(out, "selection_logit", None)
    if z is not None:
        arrays[SELECTION_LOGIT_NAME] = np.asarray(z, dtype=np.float32).reshape(-1)
    return arrays


def serialize_bytes(values: np.ndarray) -> bytes:
    """A BYTES tensor's binary data: each element's UTF-8 bytes after its 4-byte little-endian
    length (extension_binary_data.md, "the BYTES datatype")."""
    parts = []
    for value in values.reshape(-1).tolist():
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def tensor_bytes(datatype: str, values: np.ndarray) -> bytes:
    """A tensor's raw little-endian bytes, row-major (BOOL: one byte per element)."""
    if datatype == "BYTES":
        return serialize_bytes(values)
    dtype = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "BOOL": "?"}[datatype]
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def encode_tensors(
    request: InferRequest, arrays: Mapping[str, np.ndarray]
) -> list[tuple[str, str, list[int], bytes]]:
    """``(name, datatype, shape, raw bytes)`` of each requested output (default: all), in order:
    gRPC's ``raw_output_contents`` (inference_grpc.md, "Tensor Data")."""
    names = (
        [n for n in OUTPUT_DATATYPES if n in arrays]
        if request.outputs is None
        else [n for n, _ in request.outputs]
    )
    return [
        (n, OUTPUT_DATATYPES[n], list(arrays[n].shape), tensor_bytes(OUTPUT_DATATYPES[n], arrays[n]))
        for n in names
    ]


def encode_infer_response(
    request: InferRequest, decided: DecidedBatch, arrays: Mapping[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON header.

    inference_rest.md, "Inference Response JSON Object": ``model_name``, ``model_version``,
    ``id`` (echoed), ``parameters`` (the operating point, its threshold and score), ``outputs``
    in the order asked for (default: :data:`OUTPUT_DATATYPES` order). A binary output carries
    ``parameters.binary_data_size`` and its bytes follow the header in output order.
    """
    wanted = request.outputs
    if wanted is None:
        wanted = [(n, request.binary_data_output) for n in OUTPUT_DATATYPES if n in arrays]
    point = decided.decisions.point
    header: dict[str, Any] = {"model_name": decided.model, "model_version": decided.version}
    if request.id is not None:
        header["id"] = request.id
    header["parameters"] = {
        "operating_point": point.name,
        "threshold": float(point.threshold),
        "score": point.score,
    }
    outputs, blobs = [], []
    for name, binary in wanted:
        values, datatype = arrays[name], OUTPUT_DATATYPES[name]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if binary:
            blob = tensor_bytes(datatype, values)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = values.reshape(-1).tolist()  # flat, row-major; BYTES as strings
        outputs.append(tensor)
    header["outputs"] = outputs
    head = orjson.dumps(header)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
