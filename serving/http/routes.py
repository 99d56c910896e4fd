"""The service's plain Starlette routes: ``GET /metadata``, ``POST /feedback``, the review queue,
and the Open Inference Protocol's ``/v2`` endpoints (:mod:`abstain.serving.http.v2_routes`)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from abstain.serving.http.contract import ServiceProvider
from abstain.serving.http.feedback import routes as feedback_routes
from abstain.serving.http.review import routes as review_routes
from abstain.serving.http.v2_routes import routes as v2_routes


def metadata_routes(service: ServiceProvider) -> list[Route]:
    """``GET /metadata`` of the service ``service()`` returns."""

    async def metadata(_: Request) -> JSONResponse:
        running = service()
        if running is None:
            return JSONResponse({"error": "service is starting"}, status_code=503)
        return JSONResponse(running.metadata())

    return [Route("/metadata", metadata, methods=["GET"])]


def routes(service: ServiceProvider) -> list[Route]:
    """Every plain route, each reaching the service through ``service``."""
    return [
        *metadata_routes(service),
        *feedback_routes(service),
        *review_routes(service),
        *v2_routes(service),
    ]
