"""The review queue on a real 2-worker ``bentoml serve``: abstentions kept within their bounds,
listed, returned as PNG, labelled through ``/feedback`` and exported by ``abstain review export``."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serving.servers import MODEL_DIR, REPO, Server

pytestmark = pytest.mark.server

PIXEL_BYTES = 1 * 8 * 8 * 4  # one digits input as float32


@pytest.fixture(scope="module")
def review_server(start_server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Server, Path]:
    store_dir = tmp_path_factory.mktemp("review-store")
    # the byte bound (10 inputs) binds before the count bound (100)
    server = start_server(
        model_dir=MODEL_DIR, workers=2, ort_threads=1, store_dir=store_dir,
        review_queue=100, review_max_bytes=10 * PIXEL_BYTES,
    )  # fmt: skip
    return server, store_dir


def wait_total(server: Server, want: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        page = httpx.get(f"{server.url}/review", params={"limit": 100}, timeout=30).json()
        if page["total"] == want or time.monotonic() > deadline:
            return page
        time.sleep(0.1)


def test_abstentions_are_kept_listed_labelled_and_exported(review_server, tmp_path: Path) -> None:
    server, store_dir = review_server
    # uniform noise: the digits model abstains on it (checked below, per answer)
    noise = np.random.default_rng(0).random((15, 1, 8, 8), dtype=np.float32)
    ids = [f"noise-{i:02d}" for i in range(15)]
    reply = httpx.post(
        f"{server.url}/predict", json={"pixels": noise.tolist(), "request_id": ids}, timeout=30
    )
    answers = {p["request_id"]: p for p in reply.json()["predictions"]}
    abstained = [rid for rid, p in answers.items() if p["decision"] == "abstain"]
    assert len(abstained) >= 12, "the test needs noise the model abstains on"

    page = wait_total(server, 10)
    assert page["total"] == 10  # the byte bound: the 10 newest abstentions, the oldest dropped
    kept = [item["request_id"] for item in page["items"]]
    assert kept == abstained[-10:]
    first = page["items"][0]
    assert first["shape"] == [1, 8, 8] and first["image"] == f"/review/{kept[0]}"
    # each item's candidate, prediction set included, is the one its answer gave
    for item in page["items"]:
        assert item["candidate"] == answers[item["request_id"]]["candidate"]
    assert set(first["candidate"]) == {"label", "class_index", "confidence", "prediction_set"}
    assert first["candidate"]["prediction_set"]["level"] == pytest.approx(0.9)
    # paging
    second = httpx.get(f"{server.url}/review", params={"offset": 8, "limit": 5}, timeout=30).json()
    assert [i["request_id"] for i in second["items"]] == kept[8:]

    # the image, as the model saw it (8-bit)
    png = httpx.get(f"{server.url}{first['image']}", timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    i = ids.index(kept[0])
    got = np.asarray(Image.open(io.BytesIO(png.content)))
    np.testing.assert_array_equal(got, np.rint(noise[i, 0] * 255).astype(np.uint8))

    # labelling takes items out of the queue
    labels = {kept[0]: 3, kept[1]: 7, kept[2]: 3}
    body = [{"request_id": rid, "label": y} for rid, y in labels.items()]
    assert httpx.post(f"{server.url}/feedback", json=body, timeout=30).status_code == 200
    assert [item["request_id"] for item in wait_total(server, 7)["items"]] == kept[3:]

    # exported: the exact pixels and the labels, in an .npz that calibration reads
    out = tmp_path / "round-1"
    run = subprocess.run(
        [sys.executable, "-m", "abstain", "review", "export", str(out), "--store-dir", str(store_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "wrote 3 labelled review items" in run.stdout
    with np.load(out / "review.npz") as data:
        assert list(data["request_id"]) == list(labels)
        np.testing.assert_array_equal(data["y"], list(labels.values()))
        np.testing.assert_array_equal(data["x"], noise[[ids.index(r) for r in labels]])
    again = subprocess.run(
        [sys.executable, "-m", "abstain", "review", "export", str(out), "--store-dir", str(store_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode != 0 and "is not empty" in again.stderr + again.stdout


def test_review_refusals(review_server, server: Server) -> None:
    review, _ = review_server
    reply = httpx.get(f"{review.url}/review", params={"limit": 0}, timeout=30)
    assert (
        reply.status_code == 400
        and "limit should be an integer in [1, 500], but got '0'" in reply.json()["error"]
    )
    reply = httpx.get(f"{review.url}/review/never-seen", timeout=30)
    assert reply.status_code == 404 and reply.json()["reason"] == "unknown_request_id"
    reply = httpx.get(f"{server.url}/review", timeout=30)  # the shared server: queue off by default
    assert reply.status_code == 404 and "ABSTAIN_REVIEW_QUEUE" in reply.json()["error"]
