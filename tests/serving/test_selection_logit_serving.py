"""Issue 10 in serving: a graph whose g saturates is served on g's logit, embedded and via Triton.

The graph is the test factory's linear digits model with ``selection_logit`` and g's bias
shifted by +20: every image's float32 g is exactly 1.0, so only the logit z can separate them.
The calibration is written by hand (serving tests run without the calibration stage): one
coverage point on ``selection`` at the median z of the digits test images, on the logit scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from abstain.contract import CALIBRATION_FILENAME, MODEL_FILENAME, SCORE_SCALE_LOGIT
from abstain.operating_points import Calibration, OperatingPoint, save_calibration
from abstain.runtime import OnnxModel
from abstain.serving.triton.backend import TritonBackend
from tests.digits import load_digits
from tests.graph_factory import triton_config, write_model_dir
from tests.serving.servers import pytriton_dir, start_triton, stop
from tests.serving.triton_repository import write_python_backend_repository


@pytest.fixture(scope="module")
def saturated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """``(version dir, threshold)``: the saturated graph and its hand-made logit calibration."""
    version = write_model_dir(
        tmp_path_factory.mktemp("models"), name="saturated", selection_logit=True, logit_shift=20.0
    )
    model = OnnxModel(version / MODEL_FILENAME, prefer_cuda=False)
    out = model.run_batched(load_digits("test").x)
    assert (out.selection == 1.0).all() and out.selection_logit is not None
    threshold = float(np.median(out.selection_logit))
    point = OperatingPoint(
        name="coverage-0.5",
        method="coverage",
        score="selection",
        threshold=threshold,
        target_coverage=0.5,
        extra={"score_scale": SCORE_SCALE_LOGIT},
    )
    save_calibration(
        version / CALIBRATION_FILENAME,
        Calibration(graph_sha256=model.sha256, operating_points=(point,), default_operating_point=point.name),
    )
    return version, threshold


@pytest.mark.server
def test_embedded_service_decides_on_the_logit(saturated: tuple[Path, float], start_server) -> None:
    version, threshold = saturated
    server = start_server(model_dir=version, workers=1, ort_threads=1)
    x = load_digits("test").x[:60]  # within the JSON batch limit (ABSTAIN_MAX_JSON_BATCH)
    z = OnnxModel(version / MODEL_FILENAME, prefer_cuda=False).run(x).selection_logit
    with server.client() as client:
        reply = client.post("/predict", json={"pixels": x.tolist()})
    assert reply.status_code == 200, reply.text
    answers = reply.json()["predictions"]
    assert [a["decision"] == "predict" for a in answers] == (z >= threshold).tolist()
    assert [a["score_value"] for a in answers] == pytest.approx(z.tolist(), abs=1e-4)
    assert all(a["selection"] == 1.0 for a in answers)  # g itself could not have told them apart
    # about half answered (the threshold is the median z of the whole test split), not all
    assert 0.2 < np.mean(z >= threshold) < 0.8


@pytest.fixture(scope="module")
def triton(saturated: tuple[Path, float], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Triton (Python backend) with ``saturated`` and ``nologit``: the same graph, but a config
    that does not declare ``selection_logit`` (a config written for an older graph)."""
    if pytriton_dir() is None:
        pytest.skip("needs nvidia-pytriton")
    version, _ = saturated
    tmp = tmp_path_factory.mktemp("triton")
    repo = tmp / "repository"
    write_python_backend_repository(version, repo)
    old = tmp / "old" / "nologit"
    (old / version.name).mkdir(parents=True)
    spec = OnnxModel(version / MODEL_FILENAME, prefer_cuda=False).input_spec
    (old / "config.pbtxt").write_text(triton_config("nologit", spec))
    (old / "labels.txt").write_bytes((version.parent / "labels.txt").read_bytes())
    write_python_backend_repository(old / version.name, repo, graph=version / MODEL_FILENAME)
    process, http, _grpc, _log = start_triton(repo, tmp, ["saturated", "nologit"])
    yield http
    stop(process)


@pytest.mark.server
def test_triton_serves_the_logit_and_refuses_a_config_without_it(
    saturated: tuple[Path, float], triton: int
) -> None:
    version, _ = saturated
    reference = OnnxModel(version / MODEL_FILENAME, prefer_cuda=False)
    backend = TritonBackend(f"127.0.0.1:{triton}", "saturated", version.name)
    backend.verify(reference)  # accepted, and from now on it asks for selection_logit
    x = load_digits("test").x[:32]
    remote, local = backend.infer(x), reference.run(x)
    assert remote.selection_logit is not None and remote.selection_logit.shape == (32,)
    np.testing.assert_allclose(remote.selection_logit, local.selection_logit, atol=1e-5)
    with pytest.raises(ValueError, match="nologit"):
        TritonBackend(f"127.0.0.1:{triton}", "nologit", version.name).verify(reference)
