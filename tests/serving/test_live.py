"""What the live-risk alert compares with, and the request-id rules, without a server."""

from __future__ import annotations

import time
import uuid

import pytest

from abstain.contract import CALIBRATION_FILENAME
from abstain.operating_points import OperatingPoint, load_calibration
from abstain.serving.http.feedback import class_index
from abstain.serving.http.request_ids import new_request_ids, parse_request_ids
from abstain.serving.http.validation import InputRejectedError
from abstain.serving.store.live import calibrated_risk, redact
from tests.serving.servers import MODEL_DIR


def test_calibrated_risk_is_the_target_or_the_top_of_the_calibration_interval() -> None:
    points = {p.name: p for p in load_calibration(MODEL_DIR / CALIBRATION_FILENAME).operating_points}
    assert calibrated_risk(points["risk-0.05"]) == 0.05  # the SGR target, not the measured 0.011
    # the coverage points saw 0 errors among their n answers: the top of the two-sided
    # Clopper-Pearson interval, 1 - (delta/2)^(1/n) when there are no errors, not the estimate 0
    for name, n in (("coverage-0.8", 288), ("coverage-0.9", 324)):
        point = points[name]
        assert (point.extra["n_selected"], point.extra["n_errors"], point.delta) == (n, 0, 0.05)
        assert calibrated_risk(point) == pytest.approx(1 - 0.025 ** (1 / n))
    old = OperatingPoint("c", "coverage", "selection", 0.9, target_coverage=0.9, risk=0.02)
    assert calibrated_risk(old) == 0.02  # a calibration without the interval: the measured risk


@pytest.mark.parametrize(
    ("raw", "n", "want"),
    [
        (None, 3, None),
        ("a", 1, ["a"]),
        (["a", "b.c", "D-9:x_1"], 3, ["a", "b.c", "D-9:x_1"]),
        (["x" * 128], 1, ["x" * 128]),
    ],
)
def test_valid_request_ids(raw, n, want) -> None:
    assert parse_request_ids(raw, n) == want


@pytest.mark.parametrize(
    ("raw", "n", "message"),
    [
        ("a", 2, "1 ids for 2 images"),
        (["a", 3], 2, "should be strings"),
        ({"a": 1}, 1, "should be strings"),
        (["-a"], 1, "'-a' is malformed"),
        (["a b"], 1, "'a b' is malformed"),
        ([""], 1, "'' is malformed"),
        (["x" * 129], 1, "is malformed"),
        (["a", "a"], 2, "repeats an id"),
    ],
)
def test_invalid_request_ids_say_what_is_valid(raw, n, message) -> None:
    with pytest.raises(InputRejectedError, match="one request id per image") as err:
        parse_request_ids(raw, n)
    assert message in str(err.value) and err.value.reason == "bad_request_id"


def test_labels_are_class_names_or_indices() -> None:
    names = ["cat", "dog", "7"]
    assert class_index("dog", names) == 1 and class_index(2, names) == 2 and class_index("7", names) == 2
    assert class_index(3, names) is None and class_index(-1, names) is None
    assert (
        class_index(True, names) is None
        and class_index("2", names) is None
        and class_index(1.0, names) is None
    )


def test_store_urls_are_logged_without_their_password() -> None:
    assert redact("postgresql://abstain:s3cret@db:5432/abstain") == "postgresql://abstain:***@db:5432/abstain"
    assert redact("postgresql://abstain@db/abstain") == "postgresql://abstain@db/abstain"
    assert redact("sqlite") == "sqlite"


def test_new_request_ids_are_distinct_time_ordered_version_7_uuids() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_request_ids(500)
    after = time.time_ns() // 1_000_000
    assert len(ids) == len(set(ids)) == 500
    for rid in ids:
        parsed = uuid.UUID(hex=rid)
        assert (parsed.hex, parsed.version, parsed.variant) == (rid, 7, uuid.RFC_4122)
        assert before <= int(rid[:12], 16) <= after  # the first 48 bits: Unix time in ms
    time.sleep(0.002)
    later = new_request_ids(3)
    assert max(ids) < min(later)  # made later, sorted later: the store's index grows at its end
