"""A big request does not hold up the event loop: ``/livez`` and a one-image request answer meanwhile.

Against the real ``bentoml serve`` (one worker) of ``tests.serving.probe_service``: the service
plus test-only probes that see, from inside the worker, on which thread each step of a request
runs, and when the loop was free (see its docstring). A 3×64×64 model; the big requests are 64
images as JSON (the JSON limit, 786,432 numbers, 6 MB) and 256 as ``.npy`` (the batch limit,
12.6 MB).

Mechanism, no clock (:func:`test_big_request_work_runs_off_the_event_loop`): each step of a
big request that costs time — the JSON decode, the pixel conversion, the forward pass, the
decisions — runs on a thread, not on the loop; and while any one of them is held on its thread
(the probe makes it wait until the test lets it go), ``/livez`` and ``/metadata`` answer and,
unless the held step is the forward pass (a one-image request queues behind it, by design), a
one-image ``/predict`` too. A step run on the loop, or a loop that waits for the thread (a
blocking ``future.result()`` in a handler), fails it on any machine, however fast or loaded.

Timing, marked ``timing`` (:func:`test_big_request_stalls_the_loop_no_longer_than_its_refused_twin`):
a thread that holds the GIL stalls the loop as surely as work on the loop. The probe's ticker
wakes on the loop every millisecond; all times are the worker's own, and every bound is
relative to what the same run measured (the idle loop's worst gap between wakes, a step's own
duration, a refused request of the same body) plus a few GIL switch intervals
(``sys.getswitchinterval()``), never a fixed number of milliseconds:

1. while a step of a big request runs on its thread (the JSON decode aside: one orjson call
   that holds the GIL throughout, the known exception), the loop waits at most half the
   step's time, or the idle loop's worst gap plus three switch intervals if that is longer (a
   ``np.asarray`` of the whole batch, one call, holds it for nearly all of the conversion);
2. the whole big request stalls the loop (outside its decode) no longer than a *refused twin*
   — a request of the same size, read and decoded the same way, refused before any pixel is
   converted — but for a quarter of the time the big request took beyond it, or twice the
   idle loop's worst gap plus four switch intervals if that is longer.

Medians over several rounds, interleaved, so that a preempted round on a loaded machine does
not decide.
"""

from __future__ import annotations

import io
import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest

from abstain.contract import InputSpec
from tests.serving.servers import Server, stop, write_random_entry

pytestmark = pytest.mark.server

SPEC = InputSpec(3, 64, 64, mean=(0.0,) * 3, std=(1.0,) * 3)
JSON_IMAGES, NPY_IMAGES, PASS_IMAGES = 64, 256, 64  # max_json_batch, max_batch, batch_max_size
#: The longest any answer may take, a held loop's included: only ever reached when one hangs.
WAIT_S = 30.0
#: The longest the probe holds a step (then it lets it go): longer, so that a held loop shows first.
HOLD_LIMIT_S = 2 * WAIT_S
T = TypeVar("T")
#: Each step of a big request, by body kind, that must run off the loop.
STEPS = {
    "json": ["loads_json", "parse_pixels", "infer", "decide"],
    "npy": ["parse_npy", "infer", "decide"],
}


@pytest.fixture(scope="module")
def model_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A calibrated 3×64×64 entry: the digits calibration re-pinned to this graph's sha256."""
    return write_random_entry(tmp_path_factory.mktemp("models"), SPEC, weight_scale=1e-2)


@pytest.fixture(scope="module")
def probed(start_server, model_64: Path) -> Iterator[Server]:
    """The service with the test probes, one worker; stopped with this module."""
    server = start_server(
        target="tests.serving.probe_service:Abstain",
        model_dir=model_64,
        workers=1,
        ort_threads=1,
        store="off",
        max_batch=NPY_IMAGES,
        max_json_batch=JSON_IMAGES,
        batch_max_size=PASS_IMAGES,
    )
    yield server
    stop(server.process)


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def big_request(kind: str) -> tuple[bytes, dict[str, str], int]:
    """(body, headers, images) of the biggest request of ``kind`` the service takes."""
    rng = np.random.default_rng(0)
    if kind == "json":  # 4-decimal pixels: ~6 MB of JSON
        pixels = np.round(rng.random((JSON_IMAGES, *SPEC.shape)), 4).tolist()
        return json.dumps({"pixels": pixels}).encode(), {"content-type": "application/json"}, JSON_IMAGES
    body = npy(rng.random((NPY_IMAGES, *SPEC.shape), dtype=np.float32))
    return body, {"content-type": "application/x-npy"}, NPY_IMAGES


ONE = npy(np.random.default_rng(1).random(SPEC.shape, dtype=np.float32))
ONE_HEADERS = {"content-type": "application/x-npy"}


def predict(client: httpx.Client, body: bytes, headers: dict[str, str], images: int, tag: str = "") -> None:
    tagged = {**headers, "x-probe-tag": tag} if tag else headers
    reply = client.post("/predict", content=body, headers=tagged)
    assert reply.status_code == 200, reply.text[:300]
    assert len(reply.json()["predictions"]) == images


def min_size(step: str, body: bytes, images: int) -> int:
    """The size (the probe's unit for ``step``) from which a call belongs to the big request."""
    return {"loads_json": len(body), "parse_npy": len(body), "parse_pixels": images, "decide": images}.get(
        step,
        2,  # infer: the big request's passes have PASS_IMAGES images, a one-image request's one
    )


def events_of(events: list[dict[str, Any]], request: dict[str, Any]) -> list[dict[str, Any]]:
    """The probe's events that ran inside ``request`` (a tagged request the probe noted)."""
    return [e for e in events if request["start"] <= e["start"] and e["end"] <= request["end"]]


def check_detector(client: httpx.Client) -> None:
    """The probe tells the loop's thread from another, on a call made on each: else no
    ``on_loop: false`` below would mean anything."""
    control = client.post("/debug/control").json()
    assert [(e["step"], e["on_loop"]) for e in control] == [("control", True), ("control", False)], control


def answered(call: Callable[[], T], what: str) -> T:
    """``call()``, or a failure that says the loop did not answer (the probe's hold lasts longer)."""
    try:
        return call()
    except httpx.TimeoutException:
        pytest.fail(f"{what}: no answer in {WAIT_S} s: the event loop is held")


@pytest.mark.parametrize("kind", ["json", "npy"])
def test_big_request_work_runs_off_the_event_loop(probed: Server, kind: str) -> None:
    body, headers, images = big_request(kind)
    with probed.client(timeout=WAIT_S) as client, probed.client(timeout=WAIT_S) as probe:
        check_detector(client)
        for _ in range(2):  # warm up: the first requests build what later ones reuse
            predict(client, body, headers, images)
            predict(probe, ONE, ONE_HEADERS, 1)
        client.delete("/debug/events")
        client.delete("/debug/requests")
        for step in STEPS[kind]:
            size = min_size(step, body, images)
            hold: dict[str, str | int | float] = {"step": step, "min_size": size, "limit_s": HOLD_LIMIT_S}
            state = client.post("/debug/hold", params=hold)
            assert state.status_code == 200 and state.json()["on_loop"] is True, state.text
            failure: list[BaseException] = []

            def send_big(step: str = step, failure: list[BaseException] = failure) -> None:
                try:
                    with probed.client(timeout=HOLD_LIMIT_S + WAIT_S) as big:
                        predict(big, body, headers, images, tag=step)
                except BaseException as exc:  # reported by the main thread
                    failure.append(exc)

            sender = threading.Thread(target=send_big)
            sender.start()
            try:
                deadline = time.monotonic() + WAIT_S
                while True:  # until the step is held on its thread, or ran without being held
                    state = answered(lambda: client.get("/debug/hold").json(), f"{kind}: /debug/hold")
                    if state["holding"] or state["refused_on_loop"] or not sender.is_alive():
                        break
                    assert time.monotonic() < deadline, f"{kind}: {step} of the big request never ran"
                    time.sleep(0.01)
                assert state["holding"], (
                    f"{kind}: {step} of the big request was not held on a thread "
                    f"({'it ran on the event loop' if state['refused_on_loop'] else 'it never came'}): "
                    f"{state}, {failure}"
                )
                # the big request is stuck in `step` on its thread: the loop answers meanwhile
                during = f"{kind}: while {step} of the big request is held on its thread"
                assert answered(lambda: probe.get("/livez"), f"{during}, /livez").status_code == 200
                assert answered(lambda: probe.get("/metadata"), f"{during}, /metadata").status_code == 200
                if step != "infer":  # a one-image request would queue behind the held forward pass
                    answered(
                        lambda: predict(probe, ONE, ONE_HEADERS, 1, tag=f"one-during-{step}"),  # noqa: B023
                        f"{during}, a one-image /predict",
                    )
                assert sender.is_alive(), f"{during}: the big request ended: {failure}"
            finally:
                released = client.post("/debug/release").json()
                sender.join(HOLD_LIMIT_S + WAIT_S)
            assert released["released"] is True
            assert not failure, failure
        events = client.get("/debug/events").json()
        requests = client.get("/debug/requests").json()

    by_tag = {r["tag"]: r for r in requests}
    assert {*STEPS[kind], *(f"one-during-{s}" for s in STEPS[kind] if s != "infer")} == set(by_tag), requests
    for step in STEPS[kind]:
        request = by_tag[step]
        assert request["status"] == 200, request
        inside = events_of(events, request)
        big = [e for e in inside if e["size"] >= min_size(e["step"], body, images)]
        # every step of the big request, each image once, each off the loop; the one asked held
        assert sorted({e["step"] for e in big}) == sorted(STEPS[kind]), inside
        assert sum(e["size"] for e in big if e["step"] == "infer") == images, big
        assert [e for e in big if e["on_loop"]] == [], f"{kind}: ran on the event loop: {big}"
        assert [e["step"] for e in big if e["held"]] == [step], big
        if step != "infer":  # the one-image request asked meanwhile answered inside the big one
            one = by_tag[f"one-during-{step}"]
            assert request["start"] < one["start"] and one["end"] < request["end"], (request, one)


def longest_gap(ticks: list[float], start: float, end: float) -> float:
    """The longest time in ``[start, end]`` the loop's ticker did not wake (the whole span if never)."""
    points = [start, *(t for t in ticks if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(points))


def longest_stall(ticks: list[float], request: dict[str, Any], events: list[dict[str, Any]]) -> float:
    """:func:`longest_gap` over ``request``, but for the time its JSON decode ran (if it had one)."""
    decodes = [e for e in events_of(events, request) if e["step"] == "loads_json"]
    if not decodes:
        return longest_gap(ticks, request["start"], request["end"])
    (decode,) = decodes
    before = longest_gap(ticks, request["start"], decode["start"])
    return max(before, longest_gap(ticks, decode["end"], request["end"]))


def twin_request(kind: str) -> tuple[bytes, dict[str, str], int]:
    """(body, headers, status) of a request as big as :func:`big_request`'s, read, checked and decoded
    the same way, and refused before any pixel is converted: 65 images of JSON (one over the
    JSON limit: ``batch_too_large`` once decoded), or the same ``.npy`` bytes in the wrong
    layout (``bad_shape`` from the header)."""
    rng = np.random.default_rng(0)
    if kind == "json":
        pixels = np.round(rng.random((JSON_IMAGES + 1, *SPEC.shape)), 4).tolist()
        return json.dumps({"pixels": pixels}).encode(), {"content-type": "application/json"}, 413
    x = rng.random((NPY_IMAGES, *SPEC.shape), dtype=np.float32)
    body = npy(x.reshape(NPY_IMAGES, SPEC.height, SPEC.width, SPEC.channels))
    return body, {"content-type": "application/x-npy"}, 400


@pytest.mark.timing
@pytest.mark.parametrize("kind", ["json", "npy"])
def test_big_request_stalls_the_loop_no_longer_than_its_refused_twin(probed: Server, kind: str) -> None:
    body, headers, images = big_request(kind)
    twin, twin_headers, twin_status = twin_request(kind)
    rounds = 7
    with probed.client(timeout=WAIT_S) as client:
        check_detector(client)
        for _ in range(2):  # warm up
            predict(client, body, headers, images)
            assert client.post("/predict", content=twin, headers=twin_headers).status_code == twin_status
        client.delete("/debug/events")
        client.delete("/debug/requests")
        started = client.post("/debug/ticker/start").json()
        time.sleep(1.0)  # the loop idle: the baseline of this machine, now
        for i in range(rounds):  # interleaved: both see the same load
            tagged = {**twin_headers, "x-probe-tag": f"twin-{i}"}
            reply = client.post("/predict", content=twin, headers=tagged)
            assert reply.status_code == twin_status, reply.text[:300]
            predict(client, body, headers, images, tag=f"big-{i}")
        # the ticker's own check: a loop blocked on purpose shows as a gap at least that long
        block_s = 0.2
        blocked = client.post("/debug/block", params={"s": block_s}, headers={"x-probe-tag": "block"})
        assert blocked.status_code == 200, blocked.text
        ticks = client.post("/debug/ticker/stop").json()["ticks"]
        events = client.get("/debug/events").json()
        requests = {r["tag"]: r for r in client.get("/debug/requests").json()}

    bigs = [requests[f"big-{i}"] for i in range(rounds)]
    twins = [requests[f"twin-{i}"] for i in range(rounds)]
    baseline = [t for t in ticks if t < twins[0]["start"]]
    assert len(baseline) >= 100, f"the ticker woke {len(baseline)} times in a second of idle loop"
    noise = max(b - a for a, b in itertools.pairwise(baseline))  # the idle loop's worst gap
    block = requests["block"]
    assert longest_gap(ticks, block["start"], block["end"]) >= block_s  # the ticker sees a held loop
    # the twins had the same body read and decoded: the JSON decode, one call that holds the GIL
    # throughout, stalls both alike (and the big request's must not be its conversion's too)
    for request in bigs + twins:
        steps = [e["step"] for e in events_of(events, request)]
        assert steps.count("loads_json" if kind == "json" else "parse_npy") == 1, steps
    switch = started["switch_interval_s"]
    # 1. a step of a big request that runs on a thread lets the loop run for most of its time:
    # the loop's longest wait while it ran is at most half the step's own time, or the idle
    # loop's worst gap (this machine's scheduling noise, now) plus three GIL switch intervals (a
    # thread that lets the GIL pass keeps the loop waiting about one per wake) if that is longer:
    # a step shorter than that cannot hold the loop longer. Not the JSON decode: one call that
    # holds the GIL throughout, the one known exception (and the twin's decode is the same).
    floor = noise + 3 * switch
    over: dict[str, list[float]] = {}  # step: its longest loop wait beyond what it may, per call
    for request in bigs:
        for e in events_of(events, request):
            if e["step"] != "loads_json" and e["size"] >= min_size(e["step"], body, images):
                wait = longest_gap(ticks, e["start"], e["end"])
                over.setdefault(e["step"], []).append(wait - max((e["end"] - e["start"]) / 2, floor))
    assert sorted(over) == sorted(s for s in STEPS[kind] if s != "loads_json"), over
    # 2. the whole big request holds the loop no longer than its refused twin (same body read and
    # decoded, nothing converted) but for a quarter of the time its own work took beyond the
    # twin's (a slower machine takes longer, in steps that each hold the GIL a little longer),
    # or twice the idle loop's worst gap and four switch intervals if that is longer
    big_stall = statistics.median(longest_stall(ticks, r, events) for r in bigs)
    twin_stall = statistics.median(longest_stall(ticks, r, events) for r in twins)
    extra = statistics.median(r["end"] - r["start"] for r in bigs) - statistics.median(
        r["end"] - r["start"] for r in twins
    )
    slack = max(extra / 4, 2 * noise + 4 * switch)
    print(
        f"{kind}: longest loop stall, median of {rounds}: big {big_stall * 1e3:.1f} ms, refused twin "
        f"{twin_stall * 1e3:.1f} ms; idle worst gap {noise * 1e3:.1f} ms ({len(baseline)} wakes); "
        f"slack {slack * 1e3:.1f} ms; big requests {extra * 1e3:.0f} ms longer than their twins, "
        f"{[round((r['end'] - r['start']) * 1e3) for r in bigs]} ms in the worker; loop wait beyond "
        f"the allowed per step (median, ms): "
        f"{ {step: round(statistics.median(x) * 1e3, 1) for step, x in over.items()} }"
    )
    for step, beyond in over.items():
        assert statistics.median(beyond) <= 0, f"{kind}: {step} held the loop: {beyond}"
    assert big_stall <= twin_stall + slack, (big_stall, twin_stall, slack)
