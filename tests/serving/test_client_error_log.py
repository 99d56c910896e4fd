"""A client's bad request that reaches BentoML's own parsing is logged as a client error.

Against the real ``bentoml serve``: a ``text/plain`` body on ``/predict`` is left to BentoML,
which answers 400 and, left alone, logs ``ERROR Exception on /predict [POST]`` with a traceback.
The service's log filter (``abstain.serving.http.client_errors``) turns that into one INFO line.
"""

from __future__ import annotations

import time

from tests.serving.servers import Server


def test_a_wrong_content_type_is_logged_as_a_client_error_not_an_exception(server: Server) -> None:
    start = len(server.log.read_bytes())
    with server.client() as client:
        reply = client.post("/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert 400 <= reply.status_code < 500, reply.text
    deadline = time.monotonic() + 10
    written = ""
    while time.monotonic() < deadline and "client error on /predict" not in written:
        time.sleep(0.1)  # the worker's log line reaches the file shortly after the answer
        written = server.log.read_bytes()[start:].decode(errors="replace")
    assert f"client error on /predict: {reply.status_code}" in written, written[-2000:]
    assert "Exception on /predict" not in written
    assert "Traceback" not in written
