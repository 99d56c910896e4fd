"""Client errors that reach BentoML's own request parsing are logged as client errors.

BentoML 1.4 answers a body its endpoint schema refuses (a ``text/plain`` or form body on
``/predict``, a field of the wrong type) with a 400, but logs it through
``bentoml._internal.server.http_app.log_exception``: ``ERROR Exception on /predict [POST]``
with a traceback, which an operator reads as an outage. :class:`ClientErrorFilter` rewrites
exactly those records — a pydantic ``ValidationError`` or a ``BentoMLException`` whose HTTP
status is a 4xx — into one ``INFO`` line without the traceback; every 5xx and every other
exception is left as BentoML logs it.
"""

from __future__ import annotations

import logging

#: The logger BentoML's ``log_exception`` writes to.
BENTOML_HTTP_LOGGER = "bentoml._internal.server.http_app"


def client_status(exc: BaseException | None) -> int | None:
    """The 4xx status BentoML answers ``exc`` with, or ``None`` when it is not a client error."""
    if exc is None:
        return None
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return 400  # BentoML's api_endpoint_wrapper answers these 400
    if isinstance(exc, BentoMLException):
        status = int(exc.error_code.value)
        return status if 400 <= status < 500 else None
    return None


class ClientErrorFilter(logging.Filter):
    """A filter on :data:`BENTOML_HTTP_LOGGER`: a client error becomes an INFO line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        status = client_status(exc)
        if status is None or not str(record.msg).startswith("Exception on "):
            return True
        path = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        record.msg = "client error on %s: %d %s"
        record.args = (path, status, first_line[:200])
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return True


def install() -> None:
    """Add :class:`ClientErrorFilter` to BentoML's HTTP logger once (idempotent)."""
    logger = logging.getLogger(BENTOML_HTTP_LOGGER)
    if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
        logger.addFilter(ClientErrorFilter())
