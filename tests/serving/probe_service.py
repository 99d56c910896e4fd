"""The service plus a test-only probe: ``bentoml serve tests.serving.probe_service:Abstain``.

``GET /debug/live-objects`` runs a full garbage collection and answers the number of objects
the collector tracks in this worker (``len(gc.get_objects())``). It exists only here, for
tests/serving/test_request_timeout.py; the shipped service has no debug endpoint.
"""

from __future__ import annotations

import gc

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from abstain.serving.service import Abstain, metadata_app


async def _live_objects(_: Request) -> JSONResponse:
    gc.collect()
    return JSONResponse({"live_objects": len(gc.get_objects())})


metadata_app.router.routes.append(Route("/debug/live-objects", _live_objects, methods=["GET"]))

__all__ = ["Abstain"]
