"""Request ids, ``POST /feedback`` and the live selective risk, on a real 2-worker ``bentoml serve``.

The store tests run twice: the server recording into its own SQLite directory, and into a
real PostgreSQL server; each restarts the service on the same store and finds the decisions
and labels still there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from abstain.bounds import clopper_pearson
from tests.digits import load_digits
from tests.serving.conftest import empty_postgres
from tests.serving.servers import MODEL_DIR, Server, stop

pytestmark = pytest.mark.server

POINT = "coverage-0.9"
LABELS = dict(model="digits", version=MODEL_DIR.name, operating_point=POINT)
N = 60


def post_feedback(server: Server, body: object, deadline_s: float = 10.0) -> httpx.Response:
    """POST /feedback; retried while 404: the worker that answered writes its decisions within
    milliseconds, but another worker may take the label before that."""
    deadline = time.monotonic() + deadline_s
    while True:
        reply = httpx.post(f"{server.url}/feedback", json=body, timeout=30)
        if reply.status_code != 404 or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)


def wait_metric(
    server: Server, name: str, want: Callable[[float], bool], timeout: float = 15.0, **labels: str
) -> float:
    """The metric's value once ``want(value)`` holds (the gauges refresh after a label and every 5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        value = server.metric(name, **labels)
        if want(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store_options(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    """The same tests for both stores: a fresh SQLite directory, or an emptied PostgreSQL database."""
    if request.param == "sqlite":
        return {"store_dir": tmp_path_factory.mktemp("store")}
    return {"store": empty_postgres(request.getfixturevalue("postgres_url"))}


@pytest.fixture(scope="module")
def store_server(start_server, store_options: dict[str, object]) -> Server:
    return start_server(model_dir=MODEL_DIR, workers=2, ort_threads=1, operating_point=POINT, **store_options)


def test_every_answer_carries_a_request_id(server: Server) -> None:
    x = load_digits("test").x[:3].tolist()
    with server.client() as client:
        made = client.post("/predict", json={"pixels": x}).json()["predictions"]
        own = client.post("/predict", json={"pixels": x, "request_id": ["a-1", "a-2", "a.3"]}).json()
        one = client.post("/predict", json={"pixels": x[0], "request_id": "solo:1"}).json()
    ids = [p["request_id"] for p in made]
    assert len(set(ids)) == 3 and all(len(i) == 32 for i in ids)
    assert [p["request_id"] for p in own["predictions"]] == ["a-1", "a-2", "a.3"]
    assert one["predictions"][0]["request_id"] == "solo:1"


@pytest.mark.parametrize(
    ("request_id", "message"),
    [
        (["a", "b"], "request_id has 2 ids for 3 images"),
        ("a", "request_id has 1 ids for 3 images"),
        (["a", "b", "a"], "request_id repeats an id"),
        (["a", "b", "no spaces"], "request_id 'no spaces' is malformed"),
        (["a", "b", "x" * 129], "is malformed"),
    ],
)
def test_a_bad_request_id_is_a_400_that_says_what_is_valid(server: Server, request_id, message) -> None:
    x = load_digits("test").x[:3].tolist()
    before = server.metric("abstain_rejected_inputs_total", reason="bad_request_id")
    reply = httpx.post(f"{server.url}/predict", json={"pixels": x, "request_id": request_id}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["reason"] == "bad_request_id"
    assert message in reply.json()["error"] and "one request id per image" in reply.json()["error"]
    assert server.metric("abstain_rejected_inputs_total", reason="bad_request_id") == before + 1


def test_feedback_refusals_are_clear_4xx_and_counted(store_server: Server) -> None:
    x = load_digits("test").x[:2].tolist()
    ids = ["refuse-1", "refuse-2"]
    # another operating point than the live-risk test's, so these labels stay out of its window
    body = {"pixels": x, "request_id": ids, "operating_point": "coverage-0.8"}
    assert httpx.post(f"{store_server.url}/predict", json=body).status_code == 200
    assert post_feedback(store_server, {"request_id": ids[0], "label": "3"}).status_code == 200

    def count(result: str) -> float:
        return store_server.metric("abstain_feedback_total", result=result)

    cases = [
        (
            {"request_id": "never-seen", "label": "1"},
            404,
            "unknown_request_id",
            "unknown request ids ['never-seen']",
        ),
        ({"request_id": ids[0], "label": "3"}, 409, "duplicate", "labelled already"),
        ({"request_id": ids[1], "label": "ten"}, 400, "unknown_label", "valid: a class name (0, 1, 2"),
        ({"request_id": ids[1], "label": 10}, 400, "unknown_label", "class index 0-9"),
        ([{"request_id": ids[1], "label": 1}] * 2, 400, "bad_feedback", "more than once"),
        ({"request_id": ids[1]}, 400, "bad_feedback", "not request_id and label"),
        ([], 400, "bad_feedback", "holds 0 labels"),
    ]
    for body, status, reason, message in cases:
        before = count(reason)
        reply = post_feedback(store_server, body, deadline_s=0)
        assert reply.status_code == status, (body, reply.text)
        assert reply.json()["reason"] == reason and message in reply.json()["error"], reply.text
        assert count(reason) == before + 1
    # a batch with one unknown id applies nothing: ids[1] can still be labelled afterwards
    reply = post_feedback(
        store_server, [{"request_id": ids[1], "label": 1}, {"request_id": "nope", "label": 1}], 0
    )
    assert reply.status_code == 404 and reply.json()["unknown"] == ["nope"]
    assert post_feedback(store_server, {"request_id": ids[1], "label": 1}).status_code == 200
    reply = httpx.post(f"{store_server.url}/feedback", content=b"{not json", timeout=30)
    assert reply.status_code == 400 and "not JSON" in reply.json()["error"]


@pytest.mark.slow  # two server starts per store
def test_live_risk_at_metrics_is_the_hand_computed_one_and_survives_a_restart(
    start_server, store_server: Server, store_options: dict[str, object]
) -> None:
    test = load_digits("test")
    ids = [f"live-{i}" for i in range(N)]
    accepted = store_server.metric("abstain_feedback_total", result="accepted")
    with store_server.client() as client:  # three requests: both workers answer some
        preds = []
        for part in range(3):
            idx = slice(part * N // 3, (part + 1) * N // 3)
            body = {"pixels": test.x[idx].tolist(), "request_id": ids[idx]}
            preds += client.post("/predict", json=body).json()["predictions"]
    assert [p["request_id"] for p in preds] == ids
    top = [p["class_index"] if p["decision"] == "predict" else p["candidate"]["class_index"] for p in preds]
    answered = [p["decision"] == "predict" for p in preds]
    assert 0 < sum(answered) < N  # the test needs both kinds

    # label the first 50: the truth, except 4 answered ones given a wrong label on purpose
    truth = [int(y) for y in test.y[:N]]
    wrong = [i for i in range(50) if answered[i]][:4]
    labels = [(ids[i], (top[i] + 1) % 10 if i in wrong else truth[i]) for i in range(50)]
    for start in (0, 25):  # two batches: maybe two workers
        batch = [{"request_id": rid, "label": str(y)} for rid, y in labels[start : start + 25]]
        reply = post_feedback(store_server, batch)
        assert reply.status_code == 200, reply.text
        assert reply.json()["accepted"] == 25

    # worked out from the answers alone: an error is an answered image whose label is not its prediction
    n_answered = sum(answered[:50])
    errors = sum(answered[i] and labels[i][1] != top[i] for i in range(50))
    assert errors >= len(wrong)
    lower, upper = clopper_pearson(errors, n_answered, 0.95)
    assert wait_metric(
        store_server,
        "abstain_live_selective_risk",
        lambda v: v == pytest.approx(errors / n_answered),
        **LABELS,
    ) == pytest.approx(errors / n_answered)
    assert store_server.metric("abstain_live_coverage", **LABELS) == pytest.approx(n_answered / 50)
    assert store_server.metric("abstain_live_labelled_decisions", **LABELS) == 50
    assert store_server.metric("abstain_live_risk_lower_bound", **LABELS) == pytest.approx(lower)
    assert store_server.metric("abstain_live_risk_upper_bound", **LABELS) == pytest.approx(upper)
    # coverage-0.9 saw 0 errors in 324 answers at calibration (delta 0.05): the top of its
    # Clopper-Pearson interval is 1 - 0.025^(1/324)
    assert store_server.metric("abstain_calibrated_risk", **LABELS) == pytest.approx(1 - 0.025 ** (1 / 324))
    assert store_server.metric("abstain_feedback_total", result="accepted") == accepted + 50
    # the answer says which labelled answers were right
    reply = post_feedback(store_server, {"request_id": ids[50], "label": truth[50]})
    assert reply.json()["results"][0]["correct"] == ((top[50] == truth[50]) if answered[50] else None)

    # restart on the same store: the decisions and labels are still there
    stop(store_server.process)
    options = {"model_dir": MODEL_DIR, "workers": 2, "ort_threads": 1, "operating_point": POINT}
    again = start_server(**options, **store_options)
    n_answered += answered[50]
    errors += answered[50] and top[50] != truth[50]
    assert (
        wait_metric(again, "abstain_live_labelled_decisions", lambda v: v == 51, **LABELS) == 51
    )  # the refresh every 5 s reads the store without any new label
    assert again.metric("abstain_live_selective_risk", **LABELS) == pytest.approx(errors / n_answered)
    reply = post_feedback(again, {"request_id": ids[0], "label": truth[0]})
    assert reply.status_code == 409 and reply.json()["reason"] == "duplicate"
    reply = post_feedback(again, {"request_id": ids[51], "label": truth[51]})
    assert reply.status_code == 200, reply.text
    stop(again.process)


def test_with_the_store_off_answers_still_carry_ids_and_feedback_says_why_not(start_server) -> None:
    server = start_server(model_dir=MODEL_DIR, workers=1, ort_threads=1, store="off")
    x = load_digits("test").x[0].tolist()
    pred = httpx.post(f"{server.url}/predict", json={"pixels": x}, timeout=30).json()["predictions"][0]
    reply = httpx.post(
        f"{server.url}/feedback", json={"request_id": pred["request_id"], "label": 0}, timeout=30
    )
    assert reply.status_code == 503 and "ABSTAIN_STORE=off" in reply.json()["error"]
    assert "abstain_live_selective_risk" not in httpx.get(f"{server.url}/metrics", timeout=10).text
    stop(server.process)


def test_a_store_that_cannot_open_costs_the_records_never_the_answers(start_server, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the store directory should be")
    server = start_server(model_dir=MODEL_DIR, workers=1, ort_threads=1, store_dir=blocked)
    x = load_digits("test").x[:4].tolist()
    reply = httpx.post(f"{server.url}/predict", json={"pixels": x}, timeout=30)
    assert reply.status_code == 200 and len(reply.json()["predictions"]) == 4
    labels = {"model": "digits", "version": MODEL_DIR.name}
    assert wait_metric(server, "abstain_decisions_not_recorded_total", lambda v: v == 4, **labels) == 4
    rid = reply.json()["predictions"][0]["request_id"]
    reply = httpx.post(f"{server.url}/feedback", json={"request_id": rid, "label": 0}, timeout=30)
    assert reply.status_code == 503 and reply.json()["reason"] == "store_unavailable"
    assert "cannot be opened" in reply.json()["error"]
    stop(server.process)
