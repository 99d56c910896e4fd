"""A real ``bentoml serve`` (2 workers) with the embedded digits model, over HTTP on 127.0.0.1."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from abstain.contract import CALIBRATION_FILENAME, MODEL_FILENAME
from abstain.operating_points import load_calibration
from abstain.risk_coverage import selection_scores
from abstain.runtime import OnnxModel
from tests.digits import load_digits
from tests.serving.servers import MODEL_DIR, Server

pytestmark = pytest.mark.server

LABELS = dict(model="digits", version=MODEL_DIR.name)


def offline(x: np.ndarray, point_name: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(answered [N] bool, arg-max class [N], score [N]) computed offline from the graph + calibration."""
    point = load_calibration(MODEL_DIR / CALIBRATION_FILENAME).operating_point(point_name)
    out = OnnxModel(MODEL_DIR / MODEL_FILENAME).run_batched(x)
    scores = selection_scores(out.logits, out.selection, point.score)
    return scores >= point.threshold, out.logits.argmax(axis=1), scores


def test_answers_match_offline_decisions_on_the_digits_test_split(server: Server) -> None:
    test = load_digits("test")
    answered, top, scores = offline(test.x)
    chunks = np.array_split(np.arange(len(test)), 24)  # 24 concurrent requests of ~15 images
    before = {
        d: server.metric("abstain_decisions_total", decision=d, **LABELS) for d in ("predict", "abstain")
    }
    with server.client() as client, ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda idx: client.post("/predict", json={"pixels": test.x[idx].tolist()}), chunks)
        )
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200][:1]
    preds = [p for r in replies for p in r.json()["predictions"]]
    assert len(preds) == len(test)
    got_answered = np.array([p["decision"] == "predict" for p in preds])
    np.testing.assert_array_equal(got_answered, answered)
    got_top = np.array(
        [p["class_index"] if p["decision"] == "predict" else p["candidate"]["class_index"] for p in preds]
    )
    np.testing.assert_array_equal(got_top, top)
    np.testing.assert_allclose([p["score_value"] for p in preds], scores, atol=1e-6)
    default = load_calibration(MODEL_DIR / CALIBRATION_FILENAME).default_operating_point
    assert {r.json()["operating_point"] for r in replies} == {default}
    for p in preds[:50]:
        assert p["operating_point"] == default
        if p["decision"] == "abstain":
            assert "below threshold" in p["reason"] and p["candidate"]["label"] == str(
                p["candidate"]["class_index"]
            )
        else:
            assert p["label"] == str(p["class_index"])
    # counters at /metrics (merged over both workers) add up to exactly what was decided
    after = {
        d: server.metric("abstain_decisions_total", decision=d, **LABELS) for d in ("predict", "abstain")
    }
    assert after["predict"] - before["predict"] == answered.sum()
    assert after["abstain"] - before["abstain"] == (~answered).sum()


def test_abstentions_carry_their_sets_and_the_gauge_estimates_the_risk_of_the_answered(start_server) -> None:
    """One ``.npy`` request of 256 test images at coverage-0.8 to a server of its own (one worker,
    so its window holds exactly these answers): each abstention's set is the LAC set computed
    here from the logits and the calibrated quantile, and abstain_estimated_risk is mean(1 - p)
    of the answered at the calibrated temperature."""
    server = start_server(model_dir=MODEL_DIR, workers=1, ort_threads=1, store="off")
    calibration = load_calibration(MODEL_DIR / CALIBRATION_FILENAME)
    point = calibration.operating_point("coverage-0.8")
    x = load_digits("test").x[:256]
    body = io.BytesIO()
    np.save(body, x)
    with server.client() as client:
        reply = client.post(
            "/predict",
            params={"operating_point": point.name},
            content=body.getvalue(),
            headers={"content-type": "application/x-npy"},
        )
    assert reply.status_code == 200, reply.text
    preds = reply.json()["predictions"]
    logits = OnnxModel(MODEL_DIR / MODEL_FILENAME).run_batched(x).logits.astype(np.float64)

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    quantile = point.extra["prediction_set"]["quantile"]
    abstained = [i for i, p in enumerate(preds) if p["decision"] == "abstain"]
    assert len(abstained) > 20
    for i in abstained:
        want = np.flatnonzero(1.0 - softmax(logits[i : i + 1])[0] <= quantile).tolist()
        assert preds[i]["candidate"]["prediction_set"]["class_indices"] == want
        assert preds[i]["candidate"]["prediction_set"]["level"] == pytest.approx(0.9)
    answered = np.array([p["decision"] == "predict" for p in preds])
    assert calibration.temperature is not None
    expected = np.mean(1.0 - softmax(logits / calibration.temperature).max(axis=1)[answered])
    estimate = server.metric("abstain_estimated_risk", operating_point=point.name, **LABELS)
    assert estimate == pytest.approx(expected, rel=1e-9)


def test_batch_and_score_metrics_count_every_image(server: Server) -> None:
    x = load_digits("test").x[:10]
    # the default point's score, as the service computes it: what the histogram records
    point = load_calibration(MODEL_DIR / CALIBRATION_FILENAME).operating_point(None)
    out = OnnxModel(MODEL_DIR / MODEL_FILENAME).run_batched(x)
    scores = selection_scores(out.logits, out.selection, point.score, out.selection_logit)
    score = dict(score=point.score, **LABELS)

    def band() -> float:  # scores in (0.99, 0.999], the confident end where the thresholds live
        le99 = server.metric("abstain_selection_score_bucket", le="0.99", **score)
        return server.metric("abstain_selection_score_bucket", le="0.999", **score) - le99

    before_n = server.metric("abstain_selection_score_count", **LABELS)
    before_band = band()
    before_images = server.metric("abstain_batch_size_sum", **LABELS)
    with server.client() as client, ThreadPoolExecutor(4) as pool:
        list(
            pool.map(lambda i: client.post("/predict", json={"pixels": x[i].tolist()}), range(10))
        )  # one each
    assert server.metric("abstain_selection_score_count", **LABELS) - before_n == 10
    in_band = int(((scores > 0.99) & (scores <= 0.999)).sum())
    assert in_band > 0  # so the next line can fail: these images' scores lie between 0.99 and 0.999
    assert band() - before_band == in_band
    assert server.metric("abstain_batch_size_sum", **LABELS) - before_images == 10
    assert server.metric("abstain_inference_seconds_count", backend="onnxruntime", **LABELS) > 0
    point = load_calibration(MODEL_DIR / CALIBRATION_FILENAME).operating_points[0]
    target = point.target_coverage if point.target_coverage is not None else point.coverage
    assert server.metric("abstain_target_coverage", operating_point=point.name, **LABELS) == pytest.approx(
        target
    )
    rate = server.metric("abstain_abstention_rate", operating_point=point.name, **LABELS)
    assert 0.0 <= rate <= 1.0


def test_metadata_describes_model_and_operating_points(server: Server) -> None:
    with server.client() as client:
        meta = client.get("/metadata").json()
    cal = load_calibration(MODEL_DIR / CALIBRATION_FILENAME)
    assert meta["model"] == "digits" and meta["version"] == MODEL_DIR.name
    assert meta["graph_sha256"] == cal.graph_sha256
    assert meta["classes"] == [str(d) for d in range(10)]
    assert (meta["input_spec"]["channels"], meta["input_spec"]["height"], meta["input_spec"]["width"]) == (
        1,
        8,
        8,
    )
    assert [p["name"] for p in meta["operating_points"]] == cal.names
    assert [p["threshold"] for p in meta["operating_points"]] == [p.threshold for p in cal.operating_points]
    assert [p["coverage"] for p in meta["operating_points"]] == [p.coverage for p in cal.operating_points]


def test_health_endpoints(server: Server) -> None:
    with server.client() as client:
        assert client.get("/livez").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_predict_image_png_matches_offline(server: Server) -> None:
    test = load_digits("test")
    x8 = np.round(test.x[:6, 0] * 255).astype(np.uint8)  # what a PNG can carry
    answered, top, _ = offline(x8[:, None].astype(np.float32) / 255.0)
    with server.client() as client:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(x8[i]).save(buf, format="PNG")
            reply = client.post("/predict_image", files={"image": ("digit.png", buf.getvalue(), "image/png")})
            assert reply.status_code == 200, reply.text
            (p,) = reply.json()["predictions"]
            assert (p["decision"] == "predict") == answered[i]
            assert p.get("class_index", p.get("candidate", {}).get("class_index")) == top[i]


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


ONE = np.full((1, 8, 8), 0.5).tolist()
BAD_JSON_BODIES = [  # (id, raw body, reason, status, text that the error must contain)
    ("malformed", b'{"pixels": [1, 2', "bad_json", 400, "Invalid JSON"),
    ("not-an-object", b"[1, 2]", "bad_json", 400, "object"),
    ("missing-field", b"{}", "bad_json", 400, "pixels"),
    ("wrong-type", b'{"pixels": "abc"}', "bad_json", 400, "array"),
    ("nan", json.dumps({"pixels": [[[float("nan")] * 8] * 8]}).encode(), "non_finite", 400, "NaN"),
    (
        "inf",
        b'{"pixels": [[[1e400, 0, 0, 0, 0, 0, 0, 0]' + b", [0, 0, 0, 0, 0, 0, 0, 0]" * 7 + b"]]}",
        "non_finite",
        400,
        "Inf",
    ),
    ("empty", b'{"pixels": []}', "empty_batch", 400, "empty"),
    (
        "shape",
        json.dumps({"pixels": np.zeros((2, 1, 7, 8)).tolist()}).encode(),
        "bad_shape",
        400,
        "[1, 8, 8]",
    ),
    ("ragged", json.dumps({"pixels": [[[0.0] * 8] * 7 + [[0.0] * 3]]}).encode(), "bad_shape", 400, "ragged"),
    ("dtype", json.dumps({"pixels": [[["x"] * 8] * 8]}).encode(), "bad_dtype", 400, "numbers"),
    (
        "range",
        json.dumps({"pixels": np.full((1, 8, 8), 2.0).tolist()}).encode(),
        "out_of_range",
        400,
        "[0, 1]",
    ),
    (
        "too-large",
        json.dumps({"pixels": np.zeros((257, 1, 8, 8)).tolist()}).encode(),
        "batch_too_large",
        413,
        "at most 64",
    ),
    (
        "operating-point",
        json.dumps({"pixels": ONE, "operating_point": "nope"}).encode(),
        "unknown_operating_point",
        400,
        "valid: ",
    ),
]


@pytest.mark.parametrize(
    ("body", "reason", "status", "text"),
    [b[1:] for b in BAD_JSON_BODIES],
    ids=[b[0] for b in BAD_JSON_BODIES],
)
def test_bad_json_input_is_rejected_counted_and_harmless(
    server: Server, body: bytes, reason: str, status: int, text: str
) -> None:
    before = server.metric("abstain_rejected_inputs_total", reason=reason)
    with server.client() as client:
        reply = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert reply.status_code == status, reply.text
        assert text in reply.text and "error" in reply.json()
        assert server.metric("abstain_rejected_inputs_total", reason=reason) - before == 1
        assert client.get("/readyz").status_code == 200
        assert client.post("/predict", json={"pixels": ONE}).status_code == 200  # still serving


@pytest.mark.parametrize(
    "upload",
    [b"", b"GIF89a not really", _png_bytes()[:30], b"\xff\xd8\xff\xe0 truncated jpeg"],
    ids=["empty", "not-an-image", "truncated-png", "truncated-jpeg"],
)
def test_bad_upload_is_rejected_counted_and_harmless(server: Server, upload: bytes) -> None:
    before = server.metric("abstain_rejected_inputs_total", reason="bad_image")
    with server.client() as client:
        reply = client.post("/predict_image", files={"image": ("x.png", upload, "image/png")})
        assert reply.status_code == 400, reply.text
        assert "PNG or JPEG" in reply.json()["error"] or "error" in reply.json()
        assert server.metric("abstain_rejected_inputs_total", reason="bad_image") - before == 1
        assert client.get("/readyz").status_code == 200


def test_operating_point_can_be_chosen_per_request(server: Server) -> None:
    name = load_calibration(MODEL_DIR / CALIBRATION_FILENAME).names[-1]
    with server.client() as client:
        reply = client.post("/predict", json={"pixels": ONE, "operating_point": name})
    assert reply.status_code == 200 and reply.json()["operating_point"] == name


def test_oversized_body_is_refused_413_before_parsing(server: Server) -> None:
    # (kept before the tests that start another server: each `bentoml serve` start empties the
    # shared $BENTOML_HOME/prometheus_multiproc_dir, and the shared server's counters with it)
    # the JSON limit: 64 images (ABSTAIN_MAX_JSON_BATCH) x 64 pixels x 25 bytes + 64 KiB; a body
    # past it is refused whether it announces its length or streams without one, and nothing is parsed
    limit = 64 * 64 * 25 + 64 * 1024
    body = b'{"pixels": [' + b"0.5, " * (limit // 5) + b"0.5]}"
    assert len(body) > limit

    def chunks():
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    before = server.metric("abstain_rejected_inputs_total", reason="batch_too_large")
    with server.client() as client:
        for content in (body, chunks()):  # Content-Length, then chunked transfer encoding
            reply = client.post("/predict", content=content, headers={"content-type": "application/json"})
            assert reply.status_code == 413, reply.text
            assert reply.json()["reason"] == "batch_too_large"
            assert f"larger than {limit} bytes" in reply.json()["error"]
        assert server.metric("abstain_rejected_inputs_total", reason="batch_too_large") - before == 2
        assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200
        # the largest valid batch, as compact JSON at full float precision, is still accepted
        x = np.full((64, 1, 8, 8), 0.12345678901234568)
        assert client.post("/predict", json={"pixels": x.tolist()}).status_code == 200
        # 65 images are refused as JSON, 256 taken as .npy (4 bytes a pixel)
        reply = client.post("/predict", json={"pixels": np.zeros((65, 1, 8, 8)).tolist()})
        assert reply.status_code == 413 and "limit 64" in reply.json()["error"]
        buf = io.BytesIO()
        np.save(buf, np.full((256, 1, 8, 8), 0.5, np.float32))
        reply = client.post("/predict", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
        assert reply.status_code == 200 and len(reply.json()["predictions"]) == 256


def test_overload_answers_429_instead_of_hanging(start_server) -> None:
    # one worker admitting 2 requests at a time, each held ~300 ms by the batching wait
    busy = start_server(model_dir=MODEL_DIR, workers=1, max_concurrency=2, batch_max_latency_ms=300)
    with busy.client(timeout=20) as client, ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(lambda _: client.post("/predict", json={"pixels": ONE}).status_code, range(12)))
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 1 and codes.count(200) >= 2
    assert httpx.get(f"{busy.url}/readyz", timeout=5).status_code == 200


def test_a_class_conditional_point_answers_with_each_class_threshold(start_server, model_copy) -> None:
    """The digits copy calibrated with --per-class: every answer equals the offline decision with its
    predicted class's threshold (reported in the answer), and the per-class counters add up."""
    pytest.importorskip("sklearn", reason="calibrating on digits needs the calibrate extra (scikit-learn)")
    from abstain.calibration.calibrate import run_calibration
    from abstain.decisions import decide_arrays

    run_calibration(model_copy.parent, dataset="digits", coverages=[0.9], per_class=True)
    point = load_calibration(model_copy / CALIBRATION_FILENAME).operating_point("coverage-0.9-per-class")
    server = start_server(model_dir=model_copy, workers=1, ort_threads=1, store="off")
    test = load_digits("test")
    with server.client() as client:
        replies = [
            client.post("/predict", json={"pixels": test.x[i : i + 60].tolist()}) for i in range(0, 360, 60)
        ]
    preds = [p for r in replies for p in r.json()["predictions"]]
    out = OnnxModel(model_copy / MODEL_FILENAME).run_batched(test.x)
    want = decide_arrays(out.logits, out.selection, point)
    np.testing.assert_array_equal([p["decision"] == "predict" for p in preds], want.answered)
    classes = point.extra["class_thresholds"]
    assert [p["threshold"] for p in preds] == [classes[k] for k in want.class_index]
    assert len(set(classes)) == 10  # ten different thresholds, not one
    labels = dict(model="digits", version=model_copy.name, operating_point=point.name)
    for k in (0, 7):
        mine = want.class_index == k
        got = server.metric("abstain_class_decisions_total", class_index=str(k), decision="predict", **labels)
        assert got == int(want.answered[mine].sum())
