"""The decision store: every answer recorded, delayed labels joined to it, live risk read from it.

One interface, :class:`DecisionStore`, two implementations selected by ``ABSTAIN_STORE``
(:func:`open_store`):

* ``sqlite`` (the default): one SQLite file in WAL mode in ``ABSTAIN_STORE_DIR``. WAL lets the
  readers of every worker run beside the one writer, and the file outlives restarts;
* ``postgresql://…``: a PostgreSQL database shared by several replicas
  (:mod:`abstain.serving.store.postgres`, psycopg 3, the ``store-postgres`` extra).

A store object is used by one thread only (the recorder's, :mod:`abstain.serving.store.recorder`),
so it holds one plain connection. Retention (``ABSTAIN_STORE_MAX_ROWS``,
``ABSTAIN_STORE_MAX_AGE_DAYS``) is enforced by every write: the store never grows past it.

Labelling is all-or-nothing: a batch of labels is applied only if every request id is known
and not yet labelled (:class:`LabelConflictError` otherwise), so a client can retry a batch
as it is. The live statistics are over the last ``window`` *labelled* decisions of one
model, version and operating point, counted in SQL, so every worker (every replica) that
asks gets the same numbers.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

#: Columns of one recorded decision, in table order (both stores use the same schema).
COLUMNS = (
    "request_id", "t", "model", "version", "operating_point", "decision", "class_index",
    "score", "threshold",
)  # fmt: skip


class Decision(NamedTuple):
    """One answered-or-abstained image. ``class_index`` is the arg-max (the candidate of an abstention).

    A named tuple in :data:`COLUMNS` order, so that a batch goes to ``executemany`` as it is:
    the service makes one per answered image on its event loop, where a dataclass and its
    conversion to a row cost several times more (docs/benchmarks.md, "Measurements behind
    design choices").
    """

    request_id: str
    t: float  # Unix time of the answer
    model: str
    version: str
    operating_point: str
    decision: str  # "predict" | "abstain"
    class_index: int
    score: float  # the operating point's selection-score value
    threshold: float

    def row(self) -> tuple:
        """Values of :data:`COLUMNS`, in order: the tuple itself."""
        return self


@dataclass(frozen=True)
class ReviewItem:
    """An abstained input kept for people to label: the pixels the model saw and its candidate.

    ``pixels`` are the float32 bytes of the ``shape`` ``[C, H, W]`` input, in [0, 1].
    ``label`` is set by ``POST /feedback``; labelled items leave the queue (``GET /review``)
    and wait for ``abstain review export``.
    """

    request_id: str
    t: float
    model: str
    version: str
    operating_point: str
    candidate: int  # the arg-max class of the abstention
    confidence: float  # its softmax probability
    score: float
    threshold: float
    shape: tuple[int, int, int]
    pixels: bytes
    label: int | None = None
    #: the abstention's conformal set, ``{"class_indices": [...], "level": 0.9, "method": "lac"}``
    #: (:mod:`abstain.conformal`); ``None`` when its operating point has none
    prediction_set: dict[str, Any] | None = None

    def row(self) -> tuple:
        """Values of :data:`REVIEW_COLUMNS`, in order (the set as JSON text, or NULL)."""
        head = (self.request_id, self.t, self.model, self.version, self.operating_point)
        tail = (self.candidate, self.confidence, self.score, self.threshold)
        conformal = None if self.prediction_set is None else json.dumps(self.prediction_set)
        return (*head, *tail, ",".join(map(str, self.shape)), self.pixels, len(self.pixels), conformal)

    @classmethod
    def from_row(cls, row: Sequence) -> ReviewItem:
        """From ``SELECT {REVIEW_COLUMNS}, label`` (``nbytes`` left out)."""
        channels, height, width = (int(v) for v in row[9].split(","))
        rid, t, model, version, point, candidate, confidence, score, threshold = row[:9]
        return cls(
            rid, t, model, version, point, candidate, confidence, score, threshold,
            shape=(channels, height, width), pixels=bytes(row[10]), label=row[13],
            prediction_set=None if row[12] is None else json.loads(row[12]),
        )  # fmt: skip


#: Columns of one review item, in table order.
REVIEW_COLUMNS = (
    "request_id", "t", "model", "version", "operating_point", "candidate", "confidence",
    "score", "threshold", "shape", "pixels", "nbytes", "prediction_set",
)  # fmt: skip
#: Columns added to the review table after stores were first created: (name, SQL type), added
#: to an older table when a store opens it (SQLite here; PostgreSQL's schema script).
REVIEW_ADDED_COLUMNS = (("prediction_set", "TEXT"),)


@dataclass(frozen=True)
class LiveStats:
    """Counts over the last labelled decisions of one model, version and operating point.

    ``labelled`` decisions, ``answered`` of them predicted (not abstained), ``errors`` of
    those with a label other than the prediction. Selective risk is ``errors / answered``
    and coverage ``answered / labelled`` (Geifman & El-Yaniv, NeurIPS 2017).
    """

    labelled: int
    answered: int
    errors: int

    @property
    def risk(self) -> float | None:
        return self.errors / self.answered if self.answered else None

    @property
    def coverage(self) -> float | None:
        return self.answered / self.labelled if self.labelled else None


class LabelConflictError(Exception):
    """A batch of labels that cannot be applied: nothing of it was applied.

    ``unknown``: ids never recorded (or dropped by retention); ``duplicate``: ids already labelled.
    """

    def __init__(self, unknown: Sequence[str], duplicate: Sequence[str]) -> None:
        self.unknown, self.duplicate = list(unknown), list(duplicate)
        super().__init__(f"unknown request ids {self.unknown}, already labelled {self.duplicate}")


class DecisionStore(Protocol):
    """What the service needs from a store; each method is one transaction."""

    def record(self, decisions: Sequence[Decision], reviews: Sequence[ReviewItem] = ()) -> int:
        """Insert ``decisions`` (an id already present is skipped) and review items, then enforce
        retention and the review queue's bounds. Returns how many decisions were inserted."""
        ...

    def review_page(self, offset: int, limit: int) -> tuple[int, list[ReviewItem]]:
        """(unlabelled items in the queue, up to ``limit`` of them from ``offset``, oldest first)."""
        ...

    def review_item(self, request_id: str) -> ReviewItem | None:
        """One review item, labelled or not; ``None`` if not kept."""
        ...

    def labelled_reviews(self) -> list[ReviewItem]:
        """Every labelled review item, oldest first (``abstain review export``)."""
        ...

    def label(self, labels: Sequence[tuple[str, int]]) -> list[Decision]:
        """Attach ``(request_id, class_index)`` labels, all or none (:class:`LabelConflictError`).
        Returns the labelled decisions, in the order given."""
        ...

    def live_stats(self, model: str, version: str, operating_point: str, window: int) -> LiveStats:
        """:class:`LiveStats` over the last ``window`` labelled decisions (by labelling time)."""
        ...

    def count(self) -> int:
        """Rows held (for tests and the retention check)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Retention:
    """Keep at most ``max_rows`` decisions, none older than ``max_age_s`` seconds, and at most
    ``review_items`` review items of ``review_bytes`` pixel bytes in all (0: no review queue)."""

    max_rows: int
    max_age_s: float
    review_items: int = 0
    review_bytes: int = 0

    def __post_init__(self) -> None:
        if self.max_rows < 1 or not self.max_age_s > 0:
            raise ValueError(
                f"retention should keep >= 1 row for > 0 s, but got {self.max_rows} rows, {self.max_age_s} s"
            )


#: SQL shared by both stores; ``?`` placeholders (the PostgreSQL store swaps them for ``%s``).
LIVE_STATS_SQL = """
SELECT COUNT(*),
       COALESCE(SUM(CASE WHEN decision = 'predict' THEN 1 ELSE 0 END), 0),
       COALESCE(SUM(CASE WHEN decision = 'predict' AND label <> class_index THEN 1 ELSE 0 END), 0)
FROM (SELECT decision, label, class_index FROM decisions
      WHERE model = ? AND version = ? AND operating_point = ? AND label IS NOT NULL
      ORDER BY labelled_at DESC, seq DESC LIMIT ?) AS recent
"""


#: Review-queue SQL shared by both stores (``?`` placeholders). Trimming keeps the newest rows:
#: the count bound drops everything older than the ``review_items``-th newest; the byte bound
#: drops everything older than the newest row at which the running total (newest first)
#: passes ``review_bytes``.
REVIEW_TRIM_COUNT_SQL = (
    "DELETE FROM review WHERE seq <= (SELECT seq FROM review ORDER BY seq DESC LIMIT 1 OFFSET ?)"
)
REVIEW_TRIM_BYTES_SQL = """
DELETE FROM review WHERE seq <= (
    SELECT seq FROM (SELECT seq, SUM(nbytes) OVER (ORDER BY seq DESC) AS newer FROM review) AS running
    WHERE newer > ? ORDER BY seq DESC LIMIT 1)
"""
REVIEW_COUNT_SQL = "SELECT COUNT(*) FROM review WHERE label IS NULL"
REVIEW_PAGE_SQL = (
    f"SELECT {', '.join(REVIEW_COLUMNS)}, label FROM review WHERE label IS NULL ORDER BY seq LIMIT ? OFFSET ?"
)
REVIEW_ITEM_SQL = f"SELECT {', '.join(REVIEW_COLUMNS)}, label FROM review WHERE request_id = ?"
REVIEW_LABELLED_SQL = (
    f"SELECT {', '.join(REVIEW_COLUMNS)}, label FROM review WHERE label IS NOT NULL ORDER BY seq"
)


class SqliteStore:
    """:class:`DecisionStore` in one SQLite file (WAL mode), shared by the workers of one host."""

    FILENAME = "decisions.sqlite3"

    def __init__(self, directory: Path, retention: Retention) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / self.FILENAME
        self.retention = retention
        # autocommit mode (isolation_level=None): transactions are explicit, BEGIN IMMEDIATE takes
        # the write lock up front so two workers' label checks cannot interleave
        self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        # executescript commits by itself; each CREATE … IF NOT EXISTS is safe when workers race
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS decisions (
                seq INTEGER PRIMARY KEY,
                request_id TEXT NOT NULL UNIQUE,
                t REAL NOT NULL,
                model TEXT NOT NULL, version TEXT NOT NULL, operating_point TEXT NOT NULL,
                decision TEXT NOT NULL, class_index INTEGER NOT NULL,
                score REAL NOT NULL, threshold REAL NOT NULL,
                label INTEGER, labelled_at REAL);
            CREATE INDEX IF NOT EXISTS decisions_t ON decisions (t);
            CREATE INDEX IF NOT EXISTS decisions_labelled ON decisions
                (model, version, operating_point, labelled_at) WHERE label IS NOT NULL;
            CREATE TABLE IF NOT EXISTS review (
                seq INTEGER PRIMARY KEY,
                request_id TEXT NOT NULL UNIQUE,
                t REAL NOT NULL,
                model TEXT NOT NULL, version TEXT NOT NULL, operating_point TEXT NOT NULL,
                candidate INTEGER NOT NULL, confidence REAL NOT NULL,
                score REAL NOT NULL, threshold REAL NOT NULL,
                shape TEXT NOT NULL, pixels BLOB NOT NULL, nbytes INTEGER NOT NULL,
                label INTEGER, prediction_set TEXT);
            """
        )
        # a store file written before a column existed gets it (NULL for its old rows)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(review)")}
        for name, sql_type in REVIEW_ADDED_COLUMNS:
            if name not in have:
                try:
                    self._db.execute(f"ALTER TABLE review ADD COLUMN {name} {sql_type}")
                except sqlite3.OperationalError as exc:  # another worker added it first
                    if "duplicate column" not in str(exc):
                        raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def record(self, decisions: Sequence[Decision], reviews: Sequence[ReviewItem] = ()) -> int:
        with self._write() as db:
            before = db.total_changes
            db.executemany(
                f"INSERT OR IGNORE INTO decisions ({', '.join(COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(COLUMNS))})",
                decisions,  # tuples in COLUMNS order
            )
            inserted = db.total_changes - before
            # seq grows by one per row, so "seq <= newest - max_rows" leaves at most max_rows rows
            db.execute(
                "DELETE FROM decisions WHERE seq <= (SELECT MAX(seq) FROM decisions) - ?",
                (self.retention.max_rows,),
            )
            db.execute("DELETE FROM decisions WHERE t < ?", (time.time() - self.retention.max_age_s,))
            if reviews and self.retention.review_items:
                db.executemany(
                    f"INSERT OR IGNORE INTO review ({', '.join(REVIEW_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(REVIEW_COLUMNS))})",
                    [r.row() for r in reviews],
                )
                db.execute(REVIEW_TRIM_COUNT_SQL, (self.retention.review_items,))
                db.execute(REVIEW_TRIM_BYTES_SQL, (self.retention.review_bytes,))
        return inserted

    def review_page(self, offset: int, limit: int) -> tuple[int, list[ReviewItem]]:
        total = int(self._db.execute(REVIEW_COUNT_SQL).fetchone()[0])
        rows = self._db.execute(REVIEW_PAGE_SQL, (limit, offset)).fetchall()
        return total, [ReviewItem.from_row(r) for r in rows]

    def review_item(self, request_id: str) -> ReviewItem | None:
        row = self._db.execute(REVIEW_ITEM_SQL, (request_id,)).fetchone()
        return None if row is None else ReviewItem.from_row(row)

    def labelled_reviews(self) -> list[ReviewItem]:
        return [ReviewItem.from_row(r) for r in self._db.execute(REVIEW_LABELLED_SQL)]

    def label(self, labels: Sequence[tuple[str, int]]) -> list[Decision]:
        ids = [rid for rid, _ in labels]
        with self._write() as db:
            rows = {}
            for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
                chunk = ids[start : start + 500]
                for row in db.execute(
                    f"SELECT {', '.join(COLUMNS)}, label FROM decisions "
                    f"WHERE request_id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                ):
                    rows[row[0]] = row
            unknown = [rid for rid in ids if rid not in rows]
            duplicate = [rid for rid in ids if rid in rows and rows[rid][-1] is not None]
            if unknown or duplicate:
                raise LabelConflictError(unknown, duplicate)
            now = time.time()
            db.executemany(
                "UPDATE decisions SET label = ?, labelled_at = ? WHERE request_id = ?",
                [(label, now, rid) for rid, label in labels],
            )
            # a labelled abstention leaves the review queue and waits for `abstain review export`
            db.executemany(
                "UPDATE review SET label = ? WHERE request_id = ?", [(lb, rid) for rid, lb in labels]
            )
        return [Decision(*rows[rid][:-1]) for rid in ids]

    def live_stats(self, model: str, version: str, operating_point: str, window: int) -> LiveStats:
        row = self._db.execute(LIVE_STATS_SQL, (model, version, operating_point, window)).fetchone()
        return LiveStats(*(int(v) for v in row))

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def open_store(url: str, directory: Path, retention: Retention) -> DecisionStore:
    """The store ``url`` names: ``sqlite`` (a file in ``directory``) or ``postgresql://…``."""
    if url == "sqlite":
        return SqliteStore(directory, retention)
    if url.startswith(("postgresql://", "postgres://")):
        from abstain.serving.store.postgres import PostgresStore  # psycopg only when asked for

        return PostgresStore(url, retention)
    raise ValueError(f"ABSTAIN_STORE should be sqlite, off or a postgresql:// URL, but got {url!r}")
