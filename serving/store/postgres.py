"""The decision store in PostgreSQL (psycopg 3), for several replicas behind one database.

Same schema, semantics and SQL as :class:`abstain.serving.store.decision_store.SqliteStore`; selected by
``ABSTAIN_STORE=postgresql://user@host/db``. Install with ``pip install 'abstain[store-postgres]'``.
Labelling locks the rows it checks (``SELECT … FOR UPDATE``), so two replicas cannot both
accept a label for the same request id.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from abstain.serving.store.decision_store import (
    COLUMNS,
    LIVE_STATS_SQL,
    REVIEW_COLUMNS,
    REVIEW_COUNT_SQL,
    REVIEW_ITEM_SQL,
    REVIEW_LABELLED_SQL,
    REVIEW_PAGE_SQL,
    REVIEW_TRIM_BYTES_SQL,
    REVIEW_TRIM_COUNT_SQL,
    Decision,
    LabelConflictError,
    LiveStats,
    Retention,
    ReviewItem,
)


def _pg(sql: str) -> str:
    """The shared SQL with psycopg's placeholders."""
    return sql.replace("?", "%s")


SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    seq BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    t DOUBLE PRECISION NOT NULL,
    model TEXT NOT NULL, version TEXT NOT NULL, operating_point TEXT NOT NULL,
    decision TEXT NOT NULL, class_index INTEGER NOT NULL,
    score DOUBLE PRECISION NOT NULL, threshold DOUBLE PRECISION NOT NULL,
    label INTEGER, labelled_at DOUBLE PRECISION);
CREATE INDEX IF NOT EXISTS decisions_t ON decisions (t);
CREATE INDEX IF NOT EXISTS decisions_labelled ON decisions
    (model, version, operating_point, labelled_at) WHERE label IS NOT NULL;
CREATE TABLE IF NOT EXISTS review (
    seq BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    t DOUBLE PRECISION NOT NULL,
    model TEXT NOT NULL, version TEXT NOT NULL, operating_point TEXT NOT NULL,
    candidate INTEGER NOT NULL, confidence DOUBLE PRECISION NOT NULL,
    score DOUBLE PRECISION NOT NULL, threshold DOUBLE PRECISION NOT NULL,
    shape TEXT NOT NULL, pixels BYTEA NOT NULL, nbytes INTEGER NOT NULL,
    label INTEGER, prediction_set TEXT);
-- a database created before the column existed gets it (NULL for its old rows)
ALTER TABLE review ADD COLUMN IF NOT EXISTS prediction_set TEXT;
"""


class PostgresStore:
    """:class:`abstain.serving.store.decision_store.DecisionStore` in a PostgreSQL database."""

    def __init__(self, url: str, retention: Retention) -> None:
        import psycopg

        self.retention = retention
        self._db = psycopg.connect(url, connect_timeout=10)
        with self._db.transaction():
            # several workers may create the schema at once: serialise them on an advisory lock
            self._db.execute("SELECT pg_advisory_xact_lock(727113)")
            self._db.execute(SCHEMA)

    def record(self, decisions: Sequence[Decision], reviews: Sequence[ReviewItem] = ()) -> int:
        with self._db.transaction(), self._db.cursor() as cur:
            cur.executemany(
                f"INSERT INTO decisions ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
                "ON CONFLICT (request_id) DO NOTHING",
                decisions,  # tuples in COLUMNS order
                returning=False,
            )
            inserted = max(cur.rowcount, 0)
            # unlike SQLite's rowid, the sequence also advances for skipped rows: count, then trim
            # the oldest beyond max_rows (an index-only scan on the primary key)
            cur.execute(
                "DELETE FROM decisions WHERE seq <= (SELECT seq FROM decisions ORDER BY seq DESC "
                "OFFSET %s LIMIT 1)",
                (self.retention.max_rows,),
            )
            cur.execute("DELETE FROM decisions WHERE t < %s", (time.time() - self.retention.max_age_s,))
            if reviews and self.retention.review_items:
                cur.executemany(
                    f"INSERT INTO review ({', '.join(REVIEW_COLUMNS)}) "
                    f"VALUES ({', '.join(['%s'] * len(REVIEW_COLUMNS))}) ON CONFLICT (request_id) DO NOTHING",
                    [r.row() for r in reviews],
                )
                cur.execute(_pg(REVIEW_TRIM_COUNT_SQL), (self.retention.review_items,))
                cur.execute(_pg(REVIEW_TRIM_BYTES_SQL), (self.retention.review_bytes,))
        return inserted

    def review_page(self, offset: int, limit: int) -> tuple[int, list[ReviewItem]]:
        with self._db.transaction():
            total = int(_one(self._db.execute(REVIEW_COUNT_SQL).fetchone())[0])
            rows = self._db.execute(_pg(REVIEW_PAGE_SQL), (limit, offset)).fetchall()
        return total, [ReviewItem.from_row(r) for r in rows]

    def review_item(self, request_id: str) -> ReviewItem | None:
        with self._db.transaction():
            row = self._db.execute(_pg(REVIEW_ITEM_SQL), (request_id,)).fetchone()
        return None if row is None else ReviewItem.from_row(row)

    def labelled_reviews(self) -> list[ReviewItem]:
        with self._db.transaction():
            rows = self._db.execute(REVIEW_LABELLED_SQL).fetchall()
        return [ReviewItem.from_row(r) for r in rows]

    def label(self, labels: Sequence[tuple[str, int]]) -> list[Decision]:
        ids = [rid for rid, _ in labels]
        with self._db.transaction(), self._db.cursor() as cur:
            cur.execute(
                f"SELECT {', '.join(COLUMNS)}, label FROM decisions WHERE request_id = ANY(%s) FOR UPDATE",
                (ids,),
            )
            rows = {row[0]: row for row in cur.fetchall()}
            unknown = [rid for rid in ids if rid not in rows]
            duplicate = [rid for rid in ids if rid in rows and rows[rid][-1] is not None]
            if unknown or duplicate:
                raise LabelConflictError(unknown, duplicate)
            now = time.time()
            cur.executemany(
                "UPDATE decisions SET label = %s, labelled_at = %s WHERE request_id = %s",
                [(label, now, rid) for rid, label in labels],
            )
            cur.executemany(
                "UPDATE review SET label = %s WHERE request_id = %s", [(lb, rid) for rid, lb in labels]
            )
        return [Decision(*rows[rid][:-1]) for rid in ids]

    def live_stats(self, model: str, version: str, operating_point: str, window: int) -> LiveStats:
        with self._db.transaction():
            row = self._db.execute(_pg(LIVE_STATS_SQL), (model, version, operating_point, window)).fetchone()
        return LiveStats(*(int(v) for v in _one(row)))

    def count(self) -> int:
        with self._db.transaction():
            return int(_one(self._db.execute("SELECT COUNT(*) FROM decisions").fetchone())[0])

    def close(self) -> None:
        self._db.close()


def _one(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """The row of an aggregate query, which always returns one."""
    if row is None:
        raise RuntimeError("an aggregate query returned no row")
    return row
