"""One ``tritonclient`` code path, two servers: the real ``tritonserver`` serving the selective
entry ``digits-selective`` (``abstain export-selective``) and ``abstain serve`` (the session's
server) give equal ``accept`` and ``class_index`` on the whole digits test split.

The selective graph's ``accept`` is ``[N, P]``, one column per operating point of the calibration;
``abstain serve`` answers ``[N]`` at the request's ``operating_point`` parameter (which Triton's
model ignores), so the client reads the point's column where it gets two dimensions.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as triton_http

from abstain.contract import CALIBRATION_FILENAME
from abstain.operating_points import load_calibration
from tests.digits import load_digits
from tests.serving.servers import MODEL_DIR, Server, pytriton_dir, start_triton, stop
from tests.serving.triton_repository import write_python_backend_repository

pytestmark = [pytest.mark.server, pytest.mark.skipif(pytriton_dir() is None, reason="needs nvidia-pytriton")]

SELECTIVE_DIR = MODEL_DIR.parents[1] / f"{MODEL_DIR.parent.name}-selective" / MODEL_DIR.name
POINTS = load_calibration(MODEL_DIR / CALIBRATION_FILENAME).names


@pytest.fixture(scope="module")
def triton_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("triton-v2")
    write_python_backend_repository(SELECTIVE_DIR, tmp / "repository")
    process, http, _grpc, _log = start_triton(tmp / "repository", tmp, [SELECTIVE_DIR.parent.name])
    yield f"127.0.0.1:{http}"
    stop(process)


def decide(url: str, model: str, x: np.ndarray, point: str) -> tuple[np.ndarray, np.ndarray]:
    """(accept [N], class_index [N]) at ``point``: the same client code for either server."""
    client = triton_http.InferenceServerClient(url, network_timeout=60)
    accept, index = [], []
    for chunk in np.array_split(x, 4):  # under the selective entry's max_batch_size
        inp = triton_http.InferInput("pixels", list(chunk.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        result = client.infer(
            model,
            [inp],
            model_version="1",
            outputs=[triton_http.InferRequestedOutput(n) for n in ("accept", "class_index")],
            parameters={"operating_point": point},
        )
        a = result.as_numpy("accept")
        accept.append(a[:, POINTS.index(point)] if a.ndim == 2 else a)
        index.append(result.as_numpy("class_index").reshape(-1))
    return np.concatenate(accept), np.concatenate(index)


def test_triton_and_abstain_serve_decide_alike_at_every_operating_point(
    triton_url: str, server: Server
) -> None:
    x = load_digits("test").x
    abstentions = set()
    for point in POINTS:
        triton_accept, triton_index = decide(triton_url, SELECTIVE_DIR.parent.name, x, point)
        ours_accept, ours_index = decide(server.url.removeprefix("http://"), MODEL_DIR.parent.name, x, point)
        assert ours_accept.dtype == triton_accept.dtype == np.bool_
        np.testing.assert_array_equal(ours_accept, triton_accept)
        np.testing.assert_array_equal(ours_index, triton_index)
        abstentions.add(int((~ours_accept).sum()))
    assert len(abstentions) > 1  # the points abstain on different numbers of images
