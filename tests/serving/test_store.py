"""The decision stores (SQLite in WAL mode, a real PostgreSQL server) pass the same tests."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from abstain.serving.store.decision_store import (
    Decision,
    DecisionStore,
    LabelConflictError,
    LiveStats,
    Retention,
    ReviewItem,
    SqliteStore,
    open_store,
)
from abstain.serving.store.recorder import Recorder, StoreUnavailableError
from tests.serving.conftest import empty_postgres

DAY = 86400.0


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    """Factory ``make_store(max_rows, max_age_s)`` → a fresh, empty store of each kind."""
    opened: list[DecisionStore] = []
    if request.param == "postgresql":
        url = empty_postgres(request.getfixturevalue("postgres_url"))
    else:
        url = "sqlite"

    def make(
        max_rows: int = 1000, max_age_s: float = DAY, review_items: int = 0, review_bytes: int = 0
    ) -> DecisionStore:
        store = open_store(url, tmp_path, Retention(max_rows, max_age_s, review_items, review_bytes))
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def decision(i: int, decision: str = "predict", class_index: int = 0, t: float | None = None,
             point: str = "op") -> Decision:  # fmt: skip
    return Decision(
        f"r{i}", time.time() if t is None else t, "digits", "1", point, decision, class_index, 0.9, 0.5
    )


def test_labels_join_decisions_and_live_stats_count_them(make_store) -> None:
    store = make_store()
    # r0..r5 answered with class 0; r6, r7 abstained (candidate 0)
    assert store.record([decision(i) for i in range(6)] + [decision(i, "abstain") for i in (6, 7)]) == 8
    got = store.label([("r0", 0), ("r1", 3), ("r2", 0), ("r6", 5), ("r7", 0)])
    assert [d.request_id for d in got] == ["r0", "r1", "r2", "r6", "r7"]
    assert got[3].decision == "abstain" and got[1].class_index == 0
    # 5 labelled, 3 answered, 1 of them wrong (r1): risk 1/3, coverage 3/5
    stats = store.live_stats("digits", "1", "op", window=100)
    assert stats == LiveStats(labelled=5, answered=3, errors=1)
    assert stats.risk == pytest.approx(1 / 3) and stats.coverage == pytest.approx(3 / 5)
    assert store.live_stats("digits", "1", "other", 100) == LiveStats(0, 0, 0)
    assert store.live_stats("digits", "2", "op", 100).risk is None


def test_live_window_keeps_the_most_recently_labelled(make_store) -> None:
    store = make_store()
    store.record([decision(i) for i in range(4)])
    store.label([("r0", 1), ("r1", 1)])  # two errors, labelled first
    time.sleep(0.01)
    store.label([("r2", 0), ("r3", 0)])  # two right answers, labelled last
    assert store.live_stats("digits", "1", "op", window=2) == LiveStats(2, 2, 0)
    assert store.live_stats("digits", "1", "op", window=3) == LiveStats(3, 3, 1)


def test_labelling_is_all_or_nothing(make_store) -> None:
    store = make_store()
    store.record([decision(i) for i in range(3)])
    store.label([("r0", 0)])
    with pytest.raises(LabelConflictError) as err:
        store.label([("r1", 0), ("r0", 0), ("nope", 0)])
    assert err.value.unknown == ["nope"] and err.value.duplicate == ["r0"]
    assert store.live_stats("digits", "1", "op", 10).labelled == 1  # r1 was not applied
    store.label([("r1", 2)])
    assert store.live_stats("digits", "1", "op", 10) == LiveStats(2, 2, 1)


def test_a_repeated_request_id_is_recorded_once(make_store) -> None:
    store = make_store()
    assert store.record([decision(1, class_index=4)]) == 1
    assert store.record([decision(1, class_index=7), decision(2)]) == 1
    assert store.count() == 2
    assert store.label([("r1", 4)])[0].class_index == 4  # the first record stands


def test_retention_by_rows_drops_the_oldest_as_it_goes(make_store) -> None:
    store = make_store(max_rows=5)
    for start in range(0, 12, 3):
        store.record([decision(i) for i in range(start, start + 3)])
        assert store.count() <= 5
    assert store.count() == 5
    with pytest.raises(LabelConflictError) as err:
        store.label([("r6", 0)])  # r0..r6 dropped; r7..r11 kept
    assert err.value.unknown == ["r6"]
    store.label([("r7", 0), ("r11", 0)])


def test_retention_by_age(make_store) -> None:
    store = make_store(max_age_s=60)
    store.record([decision(0, t=time.time() - 120), decision(1, t=time.time() - 30)])
    assert store.count() == 1  # the 2-minute-old decision went with the write
    with pytest.raises(LabelConflictError):
        store.label([("r0", 0)])


def test_the_store_survives_reopening(make_store) -> None:
    store = make_store()
    store.record([decision(i) for i in range(3)])
    store.label([("r0", 1)])
    store.close()
    again = make_store()
    assert again.count() == 3
    assert again.live_stats("digits", "1", "op", 10) == LiveStats(1, 1, 1)
    with pytest.raises(LabelConflictError):
        again.label([("r0", 0)])


def test_sqlite_store_is_in_wal_mode(tmp_path: Path) -> None:
    SqliteStore(tmp_path, Retention(10, DAY)).close()
    with sqlite3.connect(tmp_path / SqliteStore.FILENAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_open_store_refuses_an_unknown_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="should be sqlite, off or a postgresql:// URL, but got 'redis://x'"):
        open_store("redis://x", tmp_path, Retention(10, DAY))


def test_recorder_writes_in_the_background_and_calls_after_earlier_records(tmp_path: Path) -> None:
    dropped: list[int] = []
    recorder = Recorder(lambda: SqliteStore(tmp_path, Retention(100, DAY)), dropped.append, tick_s=60)
    for i in range(20):
        recorder.record([decision(i)])
    # a call runs after everything queued before it is written
    assert asyncio.run(recorder.call(lambda store: store.count())) == 20
    with pytest.raises(LabelConflictError):
        asyncio.run(recorder.call(lambda store: store.label([("missing", 0)])))
    recorder.close()
    assert dropped == []


def test_a_failing_store_drops_records_and_counts_them_but_never_raises_to_the_caller() -> None:
    dropped: list[int] = []
    opened = threading.Event()

    def broken() -> DecisionStore:
        opened.set()
        raise OSError("disk on fire")

    recorder = Recorder(broken, dropped.append, tick_s=60)
    recorder.record([decision(0), decision(1)])  # returns at once
    with pytest.raises(StoreUnavailableError, match="cannot be opened: disk on fire"):
        asyncio.run(recorder.call(lambda store: store.count()))
    recorder.close()
    assert opened.is_set() and dropped == [2]


def review_item(i: int, value: float = 0.5, shape: tuple[int, int, int] = (1, 2, 2)) -> ReviewItem:
    pixels = np.full(shape, value, dtype=np.float32).tobytes()  # 16 bytes for [1, 2, 2]
    return ReviewItem(f"r{i}", time.time(), "digits", "1", "op", 3, 0.4, 0.2, 0.5, shape, pixels)


def test_review_queue_keeps_abstentions_until_labelled(make_store) -> None:
    store = make_store(review_items=10, review_bytes=1000)
    store.record([decision(i, "abstain") for i in range(3)], [review_item(i, 0.25 * i) for i in range(3)])
    total, page = store.review_page(offset=0, limit=2)
    assert total == 3 and [i.request_id for i in page] == ["r0", "r1"]  # oldest first
    assert [i.request_id for i in store.review_page(2, 2)[1]] == ["r2"]
    item = store.review_item("r2")
    assert item is not None and item.shape == (1, 2, 2) and item.candidate == 3 and item.label is None
    np.testing.assert_array_equal(np.frombuffer(item.pixels, np.float32), [0.5] * 4)
    store.label([("r1", 7)])
    assert [i.request_id for i in store.review_page(0, 10)[1]] == ["r0", "r2"]  # r1 left the queue
    (labelled,) = store.labelled_reviews()
    assert labelled.request_id == "r1" and labelled.label == 7
    assert store.review_item("nope") is None


def test_a_review_items_prediction_set_round_trips(make_store) -> None:
    store = make_store(review_items=10, review_bytes=1000)
    conformal = {"class_indices": [3, 8], "level": 0.9, "method": "lac"}
    empty = {"class_indices": [], "level": 0.9, "method": "lac"}  # an empty set is a set, not None
    with_set, with_empty = (
        dataclasses.replace(review_item(i), prediction_set=c) for i, c in ((0, conformal), (1, empty))
    )
    store.record([], [with_set, with_empty, review_item(2)])
    assert [i.prediction_set for i in store.review_page(0, 10)[1]] == [conformal, empty, None]


def test_an_sqlite_store_from_before_prediction_sets_gets_the_column(tmp_path: Path) -> None:
    """A store file written by an older service (no prediction_set column) opens, keeps its rows
    (their set NULL) and takes new items with a set."""
    path = tmp_path / SqliteStore.FILENAME
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE review (seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, t REAL NOT NULL, "
            "model TEXT NOT NULL, version TEXT NOT NULL, operating_point TEXT NOT NULL, candidate INTEGER "
            "NOT NULL, confidence REAL NOT NULL, score REAL NOT NULL, threshold REAL NOT NULL, shape TEXT "
            "NOT NULL, pixels BLOB NOT NULL, nbytes INTEGER NOT NULL, label INTEGER)"
        )
        old = review_item(0)
        db.execute("INSERT INTO review VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)", old.row()[:-1])
    store = open_store("sqlite", tmp_path, Retention(1000, DAY, 10, 1000))
    try:
        new = dataclasses.replace(
            review_item(1), prediction_set={"class_indices": [1], "level": 0.9, "method": "aps"}
        )
        store.record([], [new])
        assert [(i.request_id, i.prediction_set) for i in store.review_page(0, 10)[1]] == [
            ("r0", None), ("r1", new.prediction_set),
        ]  # fmt: skip
    finally:
        store.close()


def test_review_queue_bounds_drop_the_oldest(make_store) -> None:
    store = make_store(review_items=4, review_bytes=48)  # 4 items, or 3 of 16 bytes
    store.record([], [review_item(i) for i in range(3)])
    assert [i.request_id for i in store.review_page(0, 10)[1]] == ["r0", "r1", "r2"]
    store.record([], [review_item(3)])  # 64 bytes > 48: r0 goes
    assert [i.request_id for i in store.review_page(0, 10)[1]] == ["r1", "r2", "r3"]
    store.record([], [review_item(i, shape=(1, 1, 1)) for i in range(4, 7)])  # 4 bytes each
    # count bound: the 4 newest (r3 16 + 3 * 4 = 28 bytes <= 48)
    assert [i.request_id for i in store.review_page(0, 10)[1]] == ["r3", "r4", "r5", "r6"]


def test_review_queue_off_keeps_nothing(make_store) -> None:
    store = make_store()  # review_items=0
    store.record([decision(0, "abstain")], [review_item(0)])
    assert store.review_page(0, 10) == (0, [])
