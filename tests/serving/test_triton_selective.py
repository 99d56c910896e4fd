"""The selective entry (``models/digits-selective``, made by ``abstain export-selective``) served
by a real ``tritonserver``: the decision comes from Triton, over HTTP and gRPC, and equals the
service's (``serving/http/answers.py``) for every operating point on the whole digits test split.

Triton runs the graph through the Python-backend stand-in for ``onnxruntime_onnx``
(``tests/serving/triton_python_model``), as in ``test_triton.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from abstain.contract import (
    ACCEPT_NAME,
    CALIBRATION_FILENAME,
    CLASS_INDEX_NAME,
    INPUT_NAME,
    MODEL_FILENAME,
    SCORES_NAME,
)
from abstain.decisions import PREDICT
from abstain.io import sha256_file
from abstain.operating_points import load_calibration
from abstain.runtime import OnnxModel
from tests.answer_helpers import decide
from tests.digits import load_digits
from tests.serving.servers import MODEL_DIR, pytriton_dir, start_triton, stop
from tests.serving.triton_repository import write_python_backend_repository

pytestmark = [pytest.mark.server, pytest.mark.skipif(pytriton_dir() is None, reason="needs nvidia-pytriton")]

SELECTIVE_DIR = MODEL_DIR.parents[1] / f"{MODEL_DIR.parent.name}-selective" / MODEL_DIR.name


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    tmp = tmp_path_factory.mktemp("triton-selective")
    write_python_backend_repository(SELECTIVE_DIR, tmp / "repository")
    process, http, grpc, _log = start_triton(tmp / "repository", tmp, [SELECTIVE_DIR.parent.name])
    yield http, grpc
    stop(process)


def _service_decisions(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(accept [N, P], class_index [N]) as `abstain serve` (embedded ORT) decides them."""
    calibration = load_calibration(MODEL_DIR / CALIBRATION_FILENAME)
    out = OnnxModel(MODEL_DIR / MODEL_FILENAME).run(x)
    names = [str(i) for i in range(out.logits.shape[1])]
    columns = [decide(out.logits, out.selection, p, names) for p in calibration.operating_points]
    accept = np.array([[d["decision"] == PREDICT for d in col] for col in columns]).T
    index = np.array([d.get("class_index", d.get("candidate", {}).get("class_index")) for d in columns[0]])
    return accept, index


def _triton_infer(protocol: str, port: int, x: np.ndarray) -> dict[str, np.ndarray]:
    if protocol == "grpc":
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib  # type: ignore[no-redef]
    client = client_lib.InferenceServerClient(f"127.0.0.1:{port}")
    names = (ACCEPT_NAME, CLASS_INDEX_NAME, SCORES_NAME)
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for chunk in np.array_split(x, 4):  # under the entry's max_batch_size
        inp = client_lib.InferInput(INPUT_NAME, list(chunk.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        result = client.infer(
            SELECTIVE_DIR.parent.name,
            [inp],
            model_version=SELECTIVE_DIR.name,
            outputs=[client_lib.InferRequestedOutput(n) for n in names],
        )
        for n in names:
            got[n].append(result.as_numpy(n))
    return {n: np.concatenate(v) for n, v in got.items()}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_decisions_equal_the_service_on_the_digits_test_split(
    triton: tuple[int, int], protocol: str
) -> None:
    x = load_digits("test").x
    out = _triton_infer(protocol, triton[0] if protocol == "http" else triton[1], x)
    accept, index = _service_decisions(x)
    assert out[ACCEPT_NAME].dtype == np.bool_ and out[ACCEPT_NAME].shape == accept.shape
    np.testing.assert_array_equal(out[ACCEPT_NAME], accept)
    np.testing.assert_array_equal(out[CLASS_INDEX_NAME].reshape(-1), index)
    assert out[SCORES_NAME].dtype == np.float64
    # the operating points abstain on different numbers of images: the comparison has teeth
    assert len(set(accept.sum(axis=0).tolist())) > 1 and not accept.all()


def test_triton_metadata_and_provenance(triton: tuple[int, int]) -> None:
    """Triton declares the decision outputs; the entry names the calibration it was made from."""
    import tritonclient.http as client_lib

    meta = client_lib.InferenceServerClient(f"127.0.0.1:{triton[0]}").get_model_metadata(
        SELECTIVE_DIR.parent.name, SELECTIVE_DIR.name
    )
    outputs = {o["name"]: o["datatype"] for o in meta["outputs"]}
    assert outputs[ACCEPT_NAME] == "BOOL" and outputs[CLASS_INDEX_NAME] == "INT64"
    assert outputs[SCORES_NAME] == "FP64"
    import onnxruntime as ort

    props = ort.InferenceSession(str(SELECTIVE_DIR / MODEL_FILENAME)).get_modelmeta().custom_metadata_map
    info = json.loads(props["abstain.selective"])
    assert info["calibration_sha256"] == sha256_file(Path(MODEL_DIR / CALIBRATION_FILENAME))


def test_abstain_serve_fronts_the_selective_entry_and_triton_decides(
    triton: tuple[int, int], server, start_server
) -> None:
    """`abstain serve --backend triton --triton-model digits-selective`: the decision comes from
    Triton's accept, and equals the embedded service's on the whole test split."""
    remote = start_server(
        model_dir=MODEL_DIR,
        backend="triton",
        triton_url=f"grpc://127.0.0.1:{triton[1]}",
        triton_model=SELECTIVE_DIR.parent.name,
        workers=1,
    )
    x = load_digits("test").x
    # 6 chunks of 60: a JSON request holds at most ABSTAIN_MAX_JSON_BATCH (64) images
    chunks = np.array_split(np.arange(len(x)), 6)
    for point in load_calibration(MODEL_DIR / CALIBRATION_FILENAME).names:  # every operating point
        with server.client() as embedded_client, remote.client() as remote_client:
            body = [{"pixels": x[i].tolist(), "operating_point": point} for i in chunks]
            embedded = [
                p for b in body for p in embedded_client.post("/predict", json=b).json()["predictions"]
            ]
            replies = [remote_client.post("/predict", json=b) for b in body]
        assert all(r.status_code == 200 for r in replies), replies[0].text
        answers = [p for r in replies for p in r.json()["predictions"]]
        assert [a["decision"] for a in answers] == [e["decision"] for e in embedded]
        assert [a.get("class_index") for a in answers] == [e.get("class_index") for e in embedded]
    assert remote.metric("abstain_decisions_total", operating_point="coverage-0.8", decision="abstain") > 0


def test_abstain_serve_refuses_a_selective_entry_of_another_calibration(
    triton: tuple[int, int], tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    shutil.copytree(MODEL_DIR.parent, repo / MODEL_DIR.parent.name)
    shutil.copytree(SELECTIVE_DIR.parent, repo / SELECTIVE_DIR.parent.name)
    calibration = repo / MODEL_DIR.parent.name / MODEL_DIR.name / CALIBRATION_FILENAME
    raw = json.loads(calibration.read_text())
    raw["created_at"] = "2000-01-01T00:00:00+00:00"  # same graph, same points, another file
    calibration.write_text(json.dumps(raw))
    argv = [
        sys.executable,
        "-m",
        "abstain",
        "serve",
        str(repo / MODEL_DIR.parent.name / MODEL_DIR.name),
        "--backend",
        "triton",
        "--triton-url",
        f"127.0.0.1:{triton[0]}",
        "--triton-model",
        SELECTIVE_DIR.parent.name,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "another calibration" in result.stderr and "abstain export-selective" in result.stderr
