"""Request ids: one per image, the client's (checked) or made here, carried by every answer.

An answer's ``request_id`` is the key ``POST /feedback`` joins a label to, so it must be unique
and safe to echo: a client's id is 1-128 characters of :data:`REQUEST_ID`; ours are
version-7 UUIDs, which sort by time (the decision store's index grows at its end).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np

from abstain.serving.http.validation import InputRejectedError

#: A request id a client may send: 1-128 letters, digits and ``. _ : -``, starting alphanumeric.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
REQUEST_ID_TEXT = (
    "1-128 characters of letters, digits, '.', '_', ':' and '-', starting with a letter or digit"
)


def parse_request_ids(raw: Any, n: int) -> list[str] | None:
    """A client's ``request_id`` for ``n`` images → ``n`` ids (``None`` if it sent none).

    One string for one image, or a list of ``n`` distinct strings, each matching
    :data:`REQUEST_ID`. Raises :class:`InputRejectedError` (``bad_request_id``).
    """
    if raw is None:
        return None
    valid = (
        f"valid: one request id per image (a string for one image, a list of {n} distinct strings "
        f"for {n}), each {REQUEST_ID_TEXT}"
    )
    ids = [raw] if isinstance(raw, str) else raw
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InputRejectedError("bad_request_id", f"request_id should be strings; {valid}")
    if len(ids) != n:
        raise InputRejectedError("bad_request_id", f"request_id has {len(ids)} ids for {n} images; {valid}")
    bad = [i for i in ids if not REQUEST_ID.fullmatch(i)]
    if bad:
        raise InputRejectedError("bad_request_id", f"request_id {bad[0][:140]!r} is malformed; {valid}")
    if len(set(ids)) != n:
        raise InputRejectedError("bad_request_id", f"request_id repeats an id; {valid}")
    return ids


def new_request_ids(n: int) -> list[str]:
    """``n`` fresh request ids: the 32 hex digits of version-7 UUIDs (RFC 9562 §5.7).

    A version-7 UUID starts with the Unix time in milliseconds (48 bits), then 74 random bits:
    ids made later sort later, so the decision store's unique index on ``request_id`` grows at
    its right edge; with random (version-4) ids every insert lands on a random index page, and
    the cost per recorded decision grows with the table (docs/benchmarks.md). All ``n`` come
    from one ``os.urandom`` call, not one ``uuid4()`` per image on the event loop.
    """
    millis = time.time_ns() // 1_000_000
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, :6] = np.frombuffer(millis.to_bytes(6, "big"), dtype=np.uint8)  # unix_ts_ms, big-endian
    raw[:, 6] = raw[:, 6] & 0x0F | 0x70  # version 7
    raw[:, 8] = raw[:, 8] & 0x3F | 0x80  # the RFC 9562 variant (10xx)
    text = raw.tobytes().hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]
