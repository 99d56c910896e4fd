"""The Open Inference Protocol over gRPC (``ABSTAIN_GRPC_PORT``), on a real 2-worker ``bentoml serve``.

An unmodified ``tritonclient.grpc`` client: health, metadata, decisions equal ``/predict``'s on the
whole digits test split at every operating point, request ids that ``POST /feedback`` takes; bad
requests are ``INVALID_ARGUMENT`` / ``NOT_FOUND``, counted as ``/predict``'s, and the server stays
ready. Raw ``GRPCInferenceService`` stubs (tritonclient's generated modules) send what
tritonclient does not: typed ``contents`` instead of raw bytes, and lying raw sizes.
"""

from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from abstain.contract import CALIBRATION_FILENAME
from abstain.operating_points import load_calibration
from tests.digits import load_digits
from tests.serving.servers import MODEL_DIR, Server, free_port

pytestmark = pytest.mark.server

POINTS = load_calibration(MODEL_DIR / CALIBRATION_FILENAME).names


@pytest.fixture(scope="module")
def grpc_server(start_server) -> tuple[Server, str]:
    """A 2-worker server with the gRPC service on a free port of 127.0.0.1: (server, host:port)."""
    port = free_port()
    server = start_server(
        model_dir=MODEL_DIR, workers=2, ort_threads=1, grpc_port=port, grpc_host="127.0.0.1"
    )
    return server, f"127.0.0.1:{port}"


def pixels_input(x: np.ndarray, datatype: str = "FP32") -> triton_grpc.InferInput:
    inp = triton_grpc.InferInput("pixels", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def test_health_and_metadata(grpc_server: tuple[Server, str]) -> None:
    server, url = grpc_server
    client = triton_grpc.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "2") and not client.is_model_ready("cats")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "abstain" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("digits", as_json=True)
    assert model["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}]
    assert {o["name"]: o["datatype"] for o in model["outputs"]}["accept"] == "BOOL"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("cats")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert httpx.get(f"{server.url}/metadata").json()["open_inference"]["grpc_port"] == int(url.split(":")[1])


def test_decisions_equal_predict_on_the_digits_test_split_at_every_operating_point(
    grpc_server: tuple[Server, str],
) -> None:
    server, url = grpc_server
    x = load_digits("test").x
    client = triton_grpc.InferenceServerClient(url)
    abstained = set()
    for point in POINTS:
        with server.client() as http:
            replies = [
                http.post("/predict", json={"pixels": c.tolist(), "operating_point": point})
                for c in np.array_split(x, 6)
            ]
        expected = [p for r in replies for p in r.json()["predictions"]]
        got: dict[str, list[np.ndarray]] = {}
        for chunk in np.array_split(x, 2):
            result = client.infer("digits", [pixels_input(chunk)], parameters={"operating_point": point})
            assert result.get_response(as_json=True)["parameters"]["operating_point"]["string_param"] == point
            for name in ("accept", "class_index", "score"):
                got.setdefault(name, []).append(result.as_numpy(name))
        out = {k: np.concatenate(v) for k, v in got.items()}
        assert out["accept"].tolist() == [e["decision"] == "predict" for e in expected]
        top = [e.get("class_index", e.get("candidate", {}).get("class_index")) for e in expected]
        assert out["class_index"].tolist() == top
        np.testing.assert_array_equal(out["score"], [e["score_value"] for e in expected])
        abstained.add(int((~out["accept"]).sum()))
    assert len(abstained) > 1
    # counted in the same metrics as /predict: 2 x 360 decisions per point here
    assert server.metric("abstain_decisions_total", operating_point=POINTS[0]) == 2 * len(x)


def test_requested_outputs_request_ids_and_feedback(grpc_server: tuple[Server, str]) -> None:
    server, url = grpc_server
    client = triton_grpc.InferenceServerClient(url)
    x = load_digits("test").x[:2]
    request_id = f"grpc-{time.time_ns()}"
    wanted = [triton_grpc.InferRequestedOutput(n) for n in ("request_id", "label")]
    result = client.infer("digits", [pixels_input(x)], outputs=wanted, request_id=request_id)
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["request_id", "label"] and response.id == request_id
    ids = [i.decode() for i in result.as_numpy("request_id")]
    assert ids == [f"{request_id}-0", f"{request_id}-1"]
    labels = [
        {"request_id": i, "label": lab.decode()} for i, lab in zip(ids, result.as_numpy("label"), strict=True)
    ]
    deadline = time.monotonic() + 10
    while (
        reply := httpx.post(f"{server.url}/feedback", json=labels)
    ).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.2)  # decisions are written within 0.1 s
    assert reply.status_code == 200 and reply.json()["accepted"] == 2, reply.text
    # UINT8 pixels decide as their float32 / 255
    u8 = np.round(x * 255).astype(np.uint8)
    as_u8 = client.infer("digits", [pixels_input(u8, "UINT8")]).as_numpy("score")
    as_f32 = client.infer("digits", [pixels_input(u8.astype(np.float32) / 255)]).as_numpy("score")
    np.testing.assert_array_equal(as_u8, as_f32)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong-datatype", "bad_dtype"),
        ("wrong-shape", "bad_shape"),
        ("nan", "non_finite"),
        ("out-of-range", "out_of_range"),
        ("too-many-images", "batch_too_large"),
        ("unknown-output", "bad_json"),
        ("unknown-operating-point", "unknown_operating_point"),
        ("bad-request-id", "bad_request_id"),
    ],
)
def test_bad_requests_are_invalid_argument_and_counted(
    grpc_server: tuple[Server, str], case: str, reason: str
) -> None:
    server, url = grpc_server
    client = triton_grpc.InferenceServerClient(url)
    one = np.full((1, 1, 8, 8), 0.5, dtype=np.float32)
    kwargs: dict = {}
    inputs = [pixels_input(one)]
    if case == "wrong-datatype":
        inputs = [pixels_input(one.astype(np.float64), "FP64")]
    elif case == "wrong-shape":
        inputs = [pixels_input(np.zeros((1, 1, 8, 7), dtype=np.float32))]
    elif case == "nan":
        inputs = [pixels_input(np.full_like(one, np.nan))]
    elif case == "out-of-range":
        inputs = [pixels_input(one * 3)]
    elif case == "too-many-images":
        inputs = [pixels_input(np.zeros((257, 1, 8, 8), dtype=np.float32))]
    elif case == "unknown-output":
        kwargs["outputs"] = [triton_grpc.InferRequestedOutput("scores")]
    elif case == "unknown-operating-point":
        kwargs["parameters"] = {"operating_point": "strict"}
    elif case == "bad-request-id":
        kwargs["request_id"] = "not valid"
    before = server.metric("abstain_rejected_inputs_total", reason=reason)
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", inputs, **kwargs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value.message()
    assert "valid" in info.value.message()
    assert server.metric("abstain_rejected_inputs_total", reason=reason) == before + 1
    assert client.is_server_ready()


def _raw_request(**fields: object) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="digits", **fields)
    return request


def test_typed_contents_unknown_models_and_lying_raw_sizes(grpc_server: tuple[Server, str]) -> None:
    _server, url = grpc_server
    x = load_digits("test").x[:2]
    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        tensor = service_pb2.ModelInferRequest.InferInputTensor(
            name="pixels", datatype="FP32", shape=[2, 1, 8, 8]
        )
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        reply = stub.ModelInfer(_raw_request(inputs=[tensor]), timeout=30)
        names = [o.name for o in reply.outputs]
        accept = np.frombuffer(reply.raw_output_contents[names.index("accept")], dtype=np.bool_)
        assert accept.shape == (2,)
        for request, code in [
            (_raw_request(model_version="9", inputs=[tensor]), grpc.StatusCode.NOT_FOUND),
            (service_pb2.ModelInferRequest(model_name="cats", inputs=[tensor]), grpc.StatusCode.NOT_FOUND),
            # raw bytes for half the declared images
            (
                _raw_request(
                    inputs=[
                        service_pb2.ModelInferRequest.InferInputTensor(
                            name="pixels", datatype="FP32", shape=[2, 1, 8, 8]
                        )
                    ],
                    raw_input_contents=[x[:1].tobytes()],
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (_raw_request(inputs=[tensor, tensor]), grpc.StatusCode.INVALID_ARGUMENT),
            (_raw_request(), grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=30)
            assert info.value.code() == code, info.value.details()
        assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
