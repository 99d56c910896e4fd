"""Issue 18: an answer's ``score_value`` is on its ``threshold``'s scale, for every backend.

The graph is the test factory's saturated digits model (``selection_logit``, g's bias shifted by
+20: every float32 g is 1.0), calibrated by hand with two points: ``selection`` on the logit
scale (threshold: the median z of the digits test split) and ``softmax_response`` (a
probability). It is served embedded (ONNX Runtime), through Triton (plain entry) and through
Triton's selective entry (``abstain export-selective``: Triton decides). For every answer:
``score_value >= threshold`` iff it predicts, and ``score_value`` is the number the threshold is
compared with — g's logit z for the selection point (g, always 1.0, would be on another scale
and contradict the decision), the softmax response for the other. The score histograms have
the thresholds among their bucket edges, each score in the histogram of its scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from abstain.contract import CALIBRATION_FILENAME, MODEL_FILENAME, SCORE_SCALE_LOGIT
from abstain.operating_points import Calibration, OperatingPoint, save_calibration
from abstain.risk_coverage import softmax_response
from abstain.runtime import OnnxModel
from tests.digits import load_digits
from tests.graph_factory import write_model_dir
from tests.serving.servers import pytriton_dir, start_triton, stop
from tests.serving.triton_repository import write_python_backend_repository

pytestmark = pytest.mark.server

LOGIT_POINT, SR_POINT = "logit-0.5", "sr-0.7"
N = 60  # one JSON request (ABSTAIN_MAX_JSON_BATCH is 64)


@pytest.fixture(scope="module")
def entry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, float]]:
    """``(version dir, selective version dir, thresholds by point)``: the saturated graph, its
    hand-made calibration, and its selective entry next to it."""
    from abstain.export.selective_entry import export_selective_entry

    version = write_model_dir(
        tmp_path_factory.mktemp("models"), name="saturated", selection_logit=True, logit_shift=20.0
    )
    model = OnnxModel(version / MODEL_FILENAME, prefer_cuda=False)
    out = model.run_batched(load_digits("test").x)
    assert (out.selection == 1.0).all() and out.selection_logit is not None
    thresholds = {
        LOGIT_POINT: float(np.median(out.selection_logit)),
        SR_POINT: float(np.quantile(softmax_response(out.logits), 0.3)),
    }
    points = (
        OperatingPoint(
            LOGIT_POINT,
            "coverage",
            "selection",
            thresholds[LOGIT_POINT],
            target_coverage=0.5,
            extra={"score_scale": SCORE_SCALE_LOGIT},
        ),
        OperatingPoint(SR_POINT, "coverage", "softmax_response", thresholds[SR_POINT], target_coverage=0.7),
    )
    save_calibration(
        version / CALIBRATION_FILENAME,
        Calibration(graph_sha256=model.sha256, operating_points=points, default_operating_point=LOGIT_POINT),
    )
    selective = export_selective_entry(version).model_path.parent
    assert selective.parent.name == "saturated-selective"
    return version, selective, thresholds


@pytest.fixture(scope="module")
def triton(
    entry: tuple[Path, Path, dict[str, float]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """Triton (Python backend) serving the plain entry and the selective one; its gRPC port."""
    if pytriton_dir() is None:
        pytest.skip("needs nvidia-pytriton")
    version, selective, _ = entry
    tmp = tmp_path_factory.mktemp("triton-scale")
    write_python_backend_repository(version, tmp / "repository")
    write_python_backend_repository(selective, tmp / "repository")
    process, _http, grpc, _log = start_triton(
        tmp / "repository", tmp, [version.parent.name, selective.parent.name]
    )
    yield grpc
    stop(process)


@pytest.mark.parametrize("backend", ["onnxruntime", "triton", "triton-selective"])
def test_score_value_is_on_the_threshold_scale_and_decides(
    entry: tuple[Path, Path, dict[str, float]], backend: str, request: pytest.FixtureRequest, start_server
) -> None:
    version, selective, thresholds = entry
    settings: dict[str, str | int] = {"model_dir": str(version), "workers": 1, "ort_threads": 1}
    if backend != "onnxruntime":
        grpc = request.getfixturevalue("triton")
        settings.update(backend="triton", triton_url=f"grpc://127.0.0.1:{grpc}")
        if backend == "triton-selective":  # Triton decides: the service reports its accept column
            settings["triton_model"] = selective.parent.name
    server = start_server(**settings)
    x = load_digits("test").x[:N]
    local = OnnxModel(version / MODEL_FILENAME, prefer_cuda=False).run(x)
    z, sr = local.selection_logit.astype(np.float64), softmax_response(local.logits)
    with server.client() as client:
        replies = {
            p: client.post("/predict", json={"pixels": x.tolist(), "operating_point": p})
            for p in (LOGIT_POINT, SR_POINT)
        }
    for point, reply in replies.items():
        assert reply.status_code == 200, reply.text
        answers = reply.json()["predictions"]
        assert len(answers) == N
        for a in answers:
            assert a["threshold"] == thresholds[point]
            # the number next to the threshold is the one that decided
            assert (a["score_value"] >= a["threshold"]) == (a["decision"] == "predict"), a
        values = [a["score_value"] for a in answers]
        if point == LOGIT_POINT:
            assert values == pytest.approx(z.tolist(), abs=1e-5)  # g's logit, not g
            assert all(a["selection"] == 1.0 for a in answers) and thresholds[point] > 1.0
        else:
            assert values == pytest.approx(sr.tolist(), abs=1e-9)
        decisions = {a["decision"] for a in answers}
        assert decisions == {"predict", "abstain"}  # the threshold splits this batch: the test has teeth
    # the score histograms: each score on its own scale, its threshold a bucket edge
    labels = {"model": "saturated", "version": version.name}
    t = thresholds[LOGIT_POINT]
    logit = {**labels, "score": "selection"}
    assert server.metric("abstain_selection_logit_score_count", **logit) == N
    assert server.metric("abstain_selection_logit_score_bucket", le=repr(t), **logit) == int((z <= t).sum())
    assert server.metric("abstain_selection_score_count", **logit) == 0  # not read as a probability
    probability = {**labels, "score": "softmax_response"}
    assert server.metric("abstain_selection_score_count", **probability) == N
    at_sr = server.metric("abstain_selection_score_bucket", le=repr(thresholds[SR_POINT]), **probability)
    assert at_sr == int((sr <= thresholds[SR_POINT]).sum())
