"""The Open Inference Protocol (KServe / Triton v2) over REST, on the real ``bentoml serve``.

An unmodified ``tritonclient.http`` client against the session's 2-worker server
(``conftest.server``): health, metadata, binary and JSON tensors both ways, requested and
default outputs, gzip and deflate; decisions equal ``/predict``'s on the whole digits test split
at every operating point, recorded under their request ids (``POST /feedback`` takes them);
every bad request is a 4xx ``{"error": ...}`` counted as ``/predict``'s, and the server stays ready.
"""

from __future__ import annotations

import gzip
import json
import time
import zlib

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from abstain.contract import CALIBRATION_FILENAME
from abstain.operating_points import load_calibration
from tests.digits import load_digits
from tests.serving.servers import MODEL_DIR, Server

pytestmark = pytest.mark.server

INFER = "/v2/models/digits/infer"
POINTS = load_calibration(MODEL_DIR / CALIBRATION_FILENAME).names


def client_for(server: Server) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)


def pixels_input(x: np.ndarray, binary: bool = True, datatype: str = "FP32") -> triton_http.InferInput:
    inp = triton_http.InferInput("pixels", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def predict_decisions(server: Server, x: np.ndarray, point: str) -> list[dict]:
    """``/predict``'s answers for ``x``, in chunks a JSON request may carry."""
    with server.client() as client:
        replies = [
            client.post("/predict", json={"pixels": chunk.tolist(), "operating_point": point})
            for chunk in np.array_split(x, 6)
        ]
    assert all(r.status_code == 200 for r in replies), replies[0].text
    return [p for r in replies for p in r.json()["predictions"]]


def test_health_and_metadata_through_tritonclient(server: Server) -> None:
    client = client_for(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "2") and not client.is_model_ready("cats")
    meta = client.get_server_metadata()
    assert meta["name"] == "abstain" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("digits", "1")
    assert model["name"] == "digits" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]}
    assert outputs["class_index"] == ("INT64", [-1]) and outputs["accept"] == ("BOOL", [-1])
    assert outputs["logits"] == ("FP32", [-1, 10]) and outputs["label"] == ("BYTES", [-1])
    assert {"confidence", "score", "request_id", "selection"} <= set(outputs)
    # /metadata names the protocol and its extensions too
    assert httpx.get(f"{server.url}/metadata").json()["open_inference"]["extensions"] == meta["extensions"]
    for path in ("/v2/models/cats", "/v2/models/digits/versions/2", "/v2/models/digits/versions/2/ready"):
        reply = httpx.get(f"{server.url}{path}")
        assert reply.status_code == 404 and "unknown model" in reply.json()["error"], path


def test_decisions_equal_predict_on_the_digits_test_split_at_every_operating_point(server: Server) -> None:
    """Binary tensors both ways (tritonclient's default): accept, class_index, label, confidence
    and score are /predict's for all 360 test images at each operating point."""
    x = load_digits("test").x
    client = client_for(server)
    abstained = set()
    for point in POINTS:
        expected = predict_decisions(server, x, point)
        got: dict[str, list[np.ndarray]] = {}
        for chunk in np.array_split(x, 2):  # under ABSTAIN_MAX_BATCH (256)
            result = client.infer("digits", [pixels_input(chunk)], parameters={"operating_point": point})
            assert result.get_response()["parameters"]["operating_point"] == point
            for name in ("accept", "class_index", "label", "confidence", "score"):
                got.setdefault(name, []).append(result.as_numpy(name))
        out = {k: np.concatenate(v) for k, v in got.items()}
        assert out["accept"].dtype == np.bool_ and out["class_index"].dtype == np.int64
        assert out["accept"].tolist() == [e["decision"] == "predict" for e in expected]
        top = [e.get("class_index", e.get("candidate", {}).get("class_index")) for e in expected]
        assert out["class_index"].tolist() == top
        assert [s.decode() for s in out["label"]] == [str(k) for k in top]
        np.testing.assert_array_equal(out["score"], [e["score_value"] for e in expected])
        np.testing.assert_array_equal(out["confidence"], [e["confidence"] for e in expected])
        abstained.add(int((~out["accept"]).sum()))
    assert len(abstained) > 1  # the points decide differently: the comparison has teeth


def test_json_tensors_and_requested_outputs_in_order(server: Server) -> None:
    x = load_digits("test").x[:5]
    client = client_for(server)
    wanted = [
        triton_http.InferRequestedOutput("label", binary_data=False),
        triton_http.InferRequestedOutput("accept", binary_data=True),
        triton_http.InferRequestedOutput("logits", binary_data=False),
    ]
    result = client.infer("digits", [pixels_input(x, binary=False)], outputs=wanted)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["label", "accept", "logits"]
    assert "data" in response["outputs"][0] and "binary_data_size" in response["outputs"][1]["parameters"]
    assert result.as_numpy("logits").shape == (5, 10) and result.as_numpy("logits").dtype == np.float32
    default = client.infer("digits", [pixels_input(x)])  # all outputs, binary
    assert [o["name"] for o in default.get_response()["outputs"]] == [
        "logits", "selection", "class_index", "confidence", "accept", "score", "label", "request_id"
    ]  # fmt: skip
    np.testing.assert_array_equal(default.as_numpy("accept"), result.as_numpy("accept"))
    # BYTES: binary data comes back as bytes, JSON data as str (tritonclient, as with Triton)
    assert [b.decode() for b in default.as_numpy("label")] == result.as_numpy("label").tolist()
    np.testing.assert_allclose(default.as_numpy("logits"), result.as_numpy("logits"), rtol=1e-6)
    # UINT8 pixels 0-255 decide as their float32 / 255
    u8 = np.round(x * 255).astype(np.uint8)
    as_u8 = client.infer("digits", [pixels_input(u8, datatype="UINT8")])
    as_f32 = client.infer("digits", [pixels_input(u8.astype(np.float32) / 255)])
    np.testing.assert_array_equal(as_u8.as_numpy("score"), as_f32.as_numpy("score"))
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [pixels_input(x)], outputs=[triton_http.InferRequestedOutput("scores")])
    assert info.value.status() == "400" and "unknown output 'scores'" in info.value.message()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_responses(server: Server, algorithm: str) -> None:
    x = load_digits("test").x[:8]
    client = client_for(server)
    plain = client.infer("digits", [pixels_input(x)])
    packed = client.infer(
        "digits",
        [pixels_input(x)],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    for name in ("accept", "class_index", "score"):
        np.testing.assert_array_equal(packed.as_numpy(name), plain.as_numpy(name))
    # the body really is compressed, and its header length is that of the inflated body
    body = {
        "inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x[0].ravel().tolist()}
        ]
    }
    pack = gzip.compress if algorithm == "gzip" else zlib.compress
    unpack = gzip.decompress if algorithm == "gzip" else zlib.decompress
    headers = {
        "content-encoding": algorithm,
        "accept-encoding": algorithm,
        "content-type": "application/json",
    }
    with httpx.stream(
        "POST", f"{server.url}{INFER}", content=pack(json.dumps(body).encode()), headers=headers
    ) as reply:
        raw = b"".join(reply.iter_raw())  # as sent, not inflated by httpx
    assert reply.status_code == 200 and reply.headers["content-encoding"] == algorithm
    assert json.loads(unpack(raw))["outputs"][0]["name"] == "logits"


def post_feedback(server: Server, body: object, deadline_s: float = 10.0) -> httpx.Response:
    """POST /feedback, retried while 404: decisions are written within 0.1 s of the answer."""
    deadline = time.monotonic() + deadline_s
    while True:
        reply = httpx.post(f"{server.url}/feedback", json=body, timeout=30)
        if reply.status_code != 404 or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


def test_request_ids_are_recorded_and_take_feedback(server: Server) -> None:
    x = load_digits("test").x[:3]
    client = client_for(server)
    request_id = f"v2-{time.time_ns()}"
    result = client.infer(
        "digits", [pixels_input(x)], request_id=request_id, parameters={"operating_point": "coverage-0.8"}
    )
    assert result.get_response()["id"] == request_id  # echoed
    ids = [i.decode() for i in result.as_numpy("request_id")]
    assert ids == [f"{request_id}-{i}" for i in range(3)]
    labels = [
        {"request_id": rid, "label": str(k)}
        for rid, k in zip(ids, result.as_numpy("class_index").tolist(), strict=True)
    ]
    reply = post_feedback(server, labels)
    assert reply.status_code == 200, reply.text
    assert [r["operating_point"] for r in reply.json()["results"]] == ["coverage-0.8"] * 3
    # without an id the service makes one per image (distinct, 32 hex digits)
    fresh = [i.decode() for i in client.infer("digits", [pixels_input(x)]).as_numpy("request_id")]
    assert len(set(fresh)) == 3 and all(len(i) == 32 for i in fresh)
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [pixels_input(x)], request_id="no spaces please")
    assert info.value.status() == "400" and "request id" in info.value.message()


def _binary_body(
    x: np.ndarray, size: int | None = None, extra: bytes = b"", **tensor: object
) -> tuple[bytes, dict]:
    head = {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "FP32",
                "shape": list(x.shape),
                "parameters": {"binary_data_size": x.nbytes if size is None else size},
                **tensor,
            }
        ]
    }
    raw = json.dumps(head).encode()
    return raw + x.astype("<f4").tobytes() + extra, {"inference-header-content-length": str(len(raw))}


def _json(inputs: object, **rest: object) -> bytes:
    return json.dumps({"inputs": inputs, **rest}).encode()


ONE = np.full((1, 1, 8, 8), 0.5, dtype=np.float32)
FLAT = ONE.ravel().tolist()


def _tensor(**fields: object) -> dict:
    return {"name": "pixels", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": FLAT, **fields}


BAD_REQUESTS = {
    # the bad inputs of /predict's fuzzing, as v2 tensors
    "wrong-datatype": (_json([_tensor(datatype="FP16")]), {}, 400, "bad_dtype"),
    "strings-in-data": (_json([_tensor(data=["a"] * 64)]), {}, 400, "bad_dtype"),
    "bools-in-data": (_json([_tensor(data=[True] * 64)]), {}, 400, "bad_dtype"),
    "wrong-shape": (_json([_tensor(shape=[1, 1, 8, 7], data=FLAT[:56])]), {}, 400, "bad_shape"),
    "rank-3": (_json([_tensor(shape=[1, 8, 8])]), {}, 400, "bad_shape"),
    "shape-vs-data": (_json([_tensor(shape=[2, 1, 8, 8])]), {}, 400, "bad_shape"),
    "ragged": (_json([_tensor(data=[[0.5] * 8] * 7 + [[0.5] * 7])]), {}, 400, "bad_shape"),
    "out-of-range": (_json([_tensor(data=[1.5] * 64)]), {}, 400, "out_of_range"),
    "overflow": (_json([_tensor(data=[1e300] * 64)]), {}, 400, "non_finite"),
    "empty-batch": (_json([_tensor(shape=[0, 1, 8, 8], data=[])]), {}, 400, "empty_batch"),
    "json-batch-too-large": (
        _json([_tensor(shape=[65, 1, 8, 8], data=FLAT * 65)]),
        {},
        413,
        "batch_too_large",
    ),
    "uint8-floats": (_json([_tensor(datatype="UINT8", data=[0.5] * 64)]), {}, 400, "bad_dtype"),
    "not-json": (b"{not json", {}, 400, "bad_json"),
    "not-an-object": (b"[1, 2]", {}, 400, "bad_json"),
    "no-inputs": (_json([]), {}, 400, "bad_json"),
    "two-inputs": (_json([_tensor(), _tensor()]), {}, 400, "bad_json"),
    "unknown-input": (_json([_tensor(name="image")]), {}, 400, "bad_json"),
    "no-data": (_json([{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 8, 8]}]), {}, 400, "bad_json"),
    "unknown-output": (_json([_tensor()], outputs=[{"name": "scores"}]), {}, 400, "bad_json"),
    "output-twice": (
        _json([_tensor()], outputs=[{"name": "accept"}, {"name": "accept"}]),
        {},
        400,
        "bad_json",
    ),
    "unknown-operating-point": (
        _json([_tensor()], parameters={"operating_point": "strict"}),
        {},
        400,
        "unknown_operating_point",
    ),
    "operating-point-not-a-string": (
        _json([_tensor()], parameters={"operating_point": 0.9}),
        {},
        400,
        "bad_json",
    ),
    "parameters-not-an-object": (_json([_tensor()], parameters=[1]), {}, 400, "bad_json"),
    "binary-flag-not-bool": (
        _json([_tensor()], parameters={"binary_data_output": "yes"}),
        {},
        400,
        "bad_json",
    ),
    "id-not-a-string": (_json([_tensor()], id=7), {}, 400, "bad_json"),
    "classification": (
        _json([_tensor()], outputs=[{"name": "label", "parameters": {"classification": 3}}]),
        {},
        400,
        "bad_json",
    ),
    "lying-binary-size": (*_binary_body(ONE, size=128), 400, "bad_json"),
    "truncated-binary": (_binary_body(ONE)[0][:-10], _binary_body(ONE)[1], 400, "bad_json"),
    "padded-binary": (*_binary_body(ONE, extra=b"\0" * 4), 400, "bad_json"),
    "header-length-past-body": (
        _json([_tensor()]),
        {"inference-header-content-length": "99999"},
        400,
        "bad_json",
    ),
    "header-length-not-a-number": (
        _json([_tensor()]),
        {"inference-header-content-length": "x"},
        400,
        "bad_json",
    ),
    "binary-nan": (*_binary_body(np.full((1, 1, 8, 8), np.nan, dtype=np.float32)), 400, "non_finite"),
    "bad-gzip": (b"\x1f\x8b not really gzip", {"content-encoding": "gzip"}, 400, "bad_json"),
    "truncated-gzip": (gzip.compress(_json([_tensor()]))[:-8], {"content-encoding": "gzip"}, 400, "bad_json"),
    "unknown-encoding": (_json([_tensor()]), {"content-encoding": "br"}, 400, "bad_json"),
    "gzip-bomb": (
        gzip.compress(b" " * (64 * 1024 * 1024)),
        {"content-encoding": "gzip"},
        413,
        "batch_too_large",
    ),
    "body-too-large": (b" " * (1024 * 1024), {}, 413, "batch_too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_4xx_with_an_error_and_counted(server: Server, case: str) -> None:
    body, headers, status, reason = BAD_REQUESTS[case]
    before = server.metric("abstain_rejected_inputs_total", reason=reason)
    reply = httpx.post(
        f"{server.url}{INFER}",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=60,
    )
    assert reply.status_code == status, reply.text
    assert reply.json()["reason"] == reason and "valid" in reply.json()["error"], reply.text
    assert server.metric("abstain_rejected_inputs_total", reason=reason) == before + 1
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_unknown_model_or_version_is_404_and_decides_nothing(server: Server) -> None:
    decided = server.metric("abstain_decisions_total")
    for path in ("/v2/models/cats/infer", "/v2/models/digits/versions/7/infer"):
        reply = httpx.post(f"{server.url}{path}", content=_json([_tensor()]))
        assert reply.status_code == 404 and "unknown model" in reply.json()["error"]
    assert server.metric("abstain_decisions_total") == decided
    reply = httpx.post(f"{server.url}/v2/models/digits/versions/1/infer", content=_json([_tensor()]))
    assert reply.status_code == 200 and reply.json()["model_version"] == "1"
    assert server.metric("abstain_decisions_total") == decided + 1


tensor_fields = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["pixels", "x", ""]),
        "datatype": st.sampled_from(["FP32", "UINT8", "INT64", "BYTES", "fp32"]),
        "shape": st.lists(st.integers(-2, 9), max_size=5),
        "data": st.lists(st.one_of(st.floats(-1, 2), st.integers(-1, 300), st.text(max_size=2)), max_size=70),
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "x"]), st.one_of(st.integers(-1, 300), st.text(max_size=3))
        ),
    },
)
requests = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(tensor_fields, max_size=2), st.integers())},
    optional={
        "outputs": st.lists(
            st.fixed_dictionaries({"name": st.sampled_from(["accept", "label", "nope"])}), max_size=3
        ),
        "parameters": st.dictionaries(
            st.sampled_from(["operating_point", "binary_data_output"]),
            st.one_of(st.booleans(), st.text(max_size=12), st.sampled_from(POINTS)),
        ),
        "id": st.one_of(st.text(max_size=8), st.integers()),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=requests, tail=st.binary(max_size=32), header_length=st.one_of(st.none(), st.integers(-1, 400)))
def test_fuzzed_v2_requests_never_give_a_server_error(
    server: Server, body: dict, tail: bytes, header_length: int | None
) -> None:
    raw = json.dumps(body).encode()
    headers = {} if header_length is None else {"inference-header-content-length": str(header_length)}
    reply = httpx.post(
        f"{server.url}{INFER}", content=raw + tail if header_length is not None else raw, headers=headers
    )
    assert reply.status_code < 500, reply.text
    if reply.status_code >= 400:
        assert isinstance(reply.json()["error"], str)


def test_overload_is_429_on_v2_as_on_predict(start_server) -> None:
    """BentoML's max_concurrency covers /v2: with one request in flight (its body still coming),
    the next infer is 429 — and once it ends, infer answers again."""
    import socket

    busy = start_server(model_dir=MODEL_DIR, workers=1, ort_threads=1, max_concurrency=1)
    host, port = busy.url.removeprefix("http://").split(":")
    body = _json([_tensor()])
    with socket.create_connection((host, int(port)), timeout=30) as held:
        # headers and half the body: the request holds the one slot while it waits for the rest
        head = f"POST {INFER} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
        held.sendall(head.encode() + body[: len(body) // 2])
        deadline = time.monotonic() + 30
        while (reply := httpx.post(f"{busy.url}{INFER}", content=body)).status_code != 429:
            assert reply.status_code == 200 and time.monotonic() < deadline, reply.text
            time.sleep(0.05)  # until the held request has reached the worker
        assert reply.json()["error"] == "Too many requests"
        held.sendall(body[len(body) // 2 :])
        assert b"200 OK" in held.recv(65536)
    assert httpx.post(f"{busy.url}{INFER}", content=body).status_code == 200


def test_a_graph_with_selection_logit_returns_it_and_scores_on_its_scale(tmp_path, start_server) -> None:
    """The graph of tests/serving/test_selection_logit_serving.py (g saturated at 1.0): /v2 lists
    and returns ``selection_logit``, and ``score`` is that logit, the number ``accept`` compared."""
    from abstain.contract import MODEL_FILENAME, SCORE_SCALE_LOGIT
    from abstain.operating_points import Calibration, OperatingPoint, save_calibration
    from abstain.runtime import OnnxModel
    from tests.graph_factory import write_model_dir

    version = write_model_dir(tmp_path / "models", name="saturated", selection_logit=True, logit_shift=20.0)
    x = load_digits("test").x[:40]
    out = OnnxModel(version / MODEL_FILENAME, prefer_cuda=False).run(x)
    threshold = float(np.median(out.selection_logit))
    point = OperatingPoint(
        name="coverage-0.5",
        method="coverage",
        score="selection",
        threshold=threshold,
        target_coverage=0.5,
        extra={"score_scale": SCORE_SCALE_LOGIT},
    )
    sha = OnnxModel(version / MODEL_FILENAME, prefer_cuda=False).sha256
    save_calibration(
        version / CALIBRATION_FILENAME,
        Calibration(graph_sha256=sha, operating_points=(point,), default_operating_point=point.name),
    )
    saturated = start_server(model_dir=version, workers=1, ort_threads=1)
    client = client_for(saturated)
    names = [o["name"] for o in client.get_model_metadata("saturated")["outputs"]]
    assert "selection_logit" in names
    result = client.infer("saturated", [pixels_input(x)])
    assert (result.as_numpy("selection") == 1.0).all()
    np.testing.assert_allclose(result.as_numpy("selection_logit"), out.selection_logit, rtol=1e-5)
    np.testing.assert_array_equal(
        result.as_numpy("score"), result.as_numpy("selection_logit").astype(np.float64)
    )
    assert result.as_numpy("accept").tolist() == (result.as_numpy("score") >= threshold).tolist()
    assert 0 < result.as_numpy("accept").sum() < len(x)
