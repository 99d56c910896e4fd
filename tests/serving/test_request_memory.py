"""The largest request a 3×224×224 model accepts keeps its worker under its memory share.

deploy/kubernetes gives a pod 2 GiB and 2 workers: 1 GiB a worker. With the defaults
(``ABSTAIN_MAX_REQUEST_BYTES`` 32 MiB, ``ABSTAIN_MAX_JSON_BATCH`` 64), the real ``bentoml
serve`` gets the largest bodies it takes — float32 and uint8 ``.npy`` (55 and 222 images fill
32 MiB), JSON pixels with 4 decimals (15 images fill the 16 MiB JSON limit), and a 16 MiB
JSON body of zeros (55 images: the most numbers per byte) — and the worker's peak resident
memory (``VmHWM``, which includes the ~165 MiB start-up baseline) must stay under 1 GiB
(measured: 639 MiB). Without the limits the JSON body alone could reach 963 MB, buffered
twice; a 32 MiB JSON body of zeros alone peaked at 897 MiB, hence half the limit for JSON.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import psutil
import pytest

from abstain.contract import InputSpec
from tests.serving.servers import write_random_entry

pytestmark = pytest.mark.server

SPEC = InputSpec(3, 224, 224, mean=(0.0,) * 3, std=(1.0,) * 3)
LIMIT = 32 * 1024 * 1024  # the default ABSTAIN_MAX_REQUEST_BYTES
WORKER_BUDGET = 1024**3  # deploy/: 2 GiB a pod, 2 workers


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated 3×224×224 entry: the digits calibration re-pinned to this graph's sha256."""
    return write_random_entry(tmp_path_factory.mktemp("models"), SPEC, weight_scale=1e-3)


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def peak_rss(pid: int) -> int:
    """Largest ``VmHWM`` (bytes) among the processes under ``pid`` (the BentoML workers)."""
    peaks = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        peaks += [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(peaks)


def test_largest_accepted_requests_keep_the_worker_under_its_share(start_server, big_model: Path) -> None:
    server = start_server(model_dir=big_model, workers=1, ort_threads=1)
    rng = np.random.default_rng(0)
    npy_f32 = npy(rng.random((55, *SPEC.shape), dtype=np.float32))
    npy_u8 = npy(rng.integers(0, 256, (222, *SPEC.shape), dtype=np.uint8))
    pixels = np.round(rng.random((15, *SPEC.shape)), 4).tolist()
    as_json = json.dumps({"pixels": pixels}, separators=(",", ":")).encode()  # compact, as clients send
    row = b"[" + b",".join([b"0"] * 224) + b"]"
    image = b"[" + b",".join([b"[" + b",".join([row] * 224) + b"]"] * 3) + b"]"
    zeros = b'{"pixels":[' + b",".join([image] * 55) + b"]}"  # [55, 3, 224, 224], 2 bytes a number
    assert max(len(npy_f32), len(npy_u8)) <= LIMIT and max(len(as_json), len(zeros)) <= LIMIT // 2
    with server.client(timeout=120) as client:
        for body, kind in ((npy_f32, "npy"), (npy_u8, "npy"), (as_json, "json"), (zeros, "json")):
            headers = {"content-type": "application/x-npy" if kind == "npy" else "application/json"}
            reply = client.post("/predict", content=body, headers=headers)
            assert reply.status_code == 200, reply.text[:300]
        # one more float32 image (56) or JSON zeros image (56) is over the limits: refused unread
        more = b'{"pixels":[' + b",".join([image] * 56) + b"]}"
        assert len(more) > LIMIT // 2
        too_big = client.post("/predict", content=more, headers={"content-type": "application/json"})
        assert too_big.status_code == 413 and too_big.json()["reason"] == "batch_too_large"
        over = client.post(
            "/predict",
            content=npy(np.zeros((56, *SPEC.shape), np.float32)),
            headers={"content-type": "application/x-npy"},
        )
        assert over.status_code == 413 and over.json()["reason"] == "batch_too_large"
    peak = peak_rss(server.process.pid)
    print(f"worker peak RSS {peak / 2**20:.0f} MiB")
    assert peak < WORKER_BUDGET, f"worker peak RSS {peak / 2**20:.0f} MiB"
