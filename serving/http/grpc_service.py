"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``, as tritonclient.grpc speaks it.

kserve/open-inference-protocol ``specification/protocol/inference_grpc.md``: ``ServerLive``,
``ServerReady``, ``ModelReady``, ``ServerMetadata``, ``ModelMetadata`` and ``ModelInfer``; every
other method of Triton's service answers ``UNIMPLEMENTED`` (the generated base class).

One ``grpc.aio`` server per BentoML worker, started by the service's startup hook on the worker's
own event loop (:func:`start`), on ``ABSTAIN_GRPC_PORT``: gRPC sets ``SO_REUSEPORT`` by default on
Linux, so the workers share the port as they share the HTTP one, and the kernel spreads
connections over them. A call runs the same path as ``POST /v2/.../infer``: the request is turned
into the REST request's JSON and binary part and checked by
:func:`abstain.serving.http.open_inference.parse_infer_request`, decided by
:meth:`ServiceContract.decide_batch` (metrics, decision store), and its errors are mapped and
counted by :func:`abstain.serving.http.responses.error_response` — a 4xx becomes
``INVALID_ARGUMENT``, a 503 ``UNAVAILABLE``, a 500 ``INTERNAL``; an unknown model or version is
``NOT_FOUND``. Limits: at most ``ABSTAIN_MAX_CONCURRENCY`` calls in flight per worker (then
``RESOURCE_EXHAUSTED``, as HTTP's 429), ``ABSTAIN_TIMEOUT`` seconds a call (``DEADLINE_EXCEEDED``),
and a message at most the binary body limit (gRPC refuses larger ones with ``RESOURCE_EXHAUSTED``).

Proto: the generated ``service_pb2`` / ``service_pb2_grpc`` modules that ``tritonclient[grpc]``
ships (package ``inference``, Triton's ``grpc_service.proto``, a superset of the OIP's), rather
than a vendored copy: they are the exact messages ``tritonclient.grpc`` sends, they stay in step
with the client, and ``grpcio``/``protobuf`` come with them (extra ``triton-client``), so the
``serve`` extra does not grow. Imported only when ``ABSTAIN_GRPC_PORT`` is set.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from abstain.serving.http.open_inference import (
    InferRequest,
    available_outputs,
    encode_tensors,
    output_arrays,
    parse_infer_request,
)
from abstain.serving.http.responses import error_response
from abstain.serving.http.v2_routes import THREAD_BYTES, model_metadata, server_metadata

if TYPE_CHECKING:
    from abstain.serving.http.contract import ServiceContract

log = logging.getLogger("bentoml.abstain")

#: What ``ABSTAIN_GRPC_PORT`` needs installed.
MISSING = (
    "ABSTAIN_GRPC_PORT needs grpcio and the inference service stubs of tritonclient: "
    "pip install 'abstain[triton-client]' (tritonclient[grpc]), or unset ABSTAIN_GRPC_PORT"
)


def _parameter(value: Any) -> Any:
    """An ``InferParameter`` (a oneof of bool, int64, string, double, uint64) as a Python value."""
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def _set_parameter(target: Any, value: bool | int | float | str) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value


#: Where each input datatype's values sit in ``InferTensorContents`` (inference_grpc.md, "Tensor Data").
CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}


def as_rest(request: Any) -> tuple[dict[str, Any], memoryview]:
    """A ``ModelInferRequest`` → the REST request's JSON object and binary part, for the one parser.

    ``raw_input_contents[i]`` (what tritonclient sends) becomes input ``i``'s binary data with its
    ``binary_data_size``; ``contents`` its JSON ``data``."""
    payload: dict[str, Any] = {
        "parameters": {k: _parameter(v) for k, v in request.parameters.items()},
        "inputs": [],
    }
    if request.id:
        payload["id"] = request.id
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        payload["inputs"] = None  # refused by the parser, naming the inputs
    binary = b""
    for i, tensor in enumerate(request.inputs):
        item: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
            "parameters": {k: _parameter(v) for k, v in tensor.parameters.items()},
        }
        if raw:
            item["parameters"]["binary_data_size"] = len(raw[i])
            binary += raw[i]
        else:
            field = CONTENTS.get(tensor.datatype)
            item["data"] = list(getattr(tensor.contents, field)) if field else []
        if payload["inputs"] is not None:
            payload["inputs"].append(item)
    if request.outputs:
        payload["outputs"] = [
            {"name": o.name, "parameters": {k: _parameter(v) for k, v in o.parameters.items()}}
            for o in request.outputs
        ]
    return payload, memoryview(binary)


def servicer(service: ServiceContract) -> Any:
    """The ``GRPCInferenceService`` servicer of ``service`` (this worker's)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    in_flight = asyncio.Semaphore(service.settings.max_concurrency)

    def known(name: str, version: str) -> bool:
        served, served_version = service.served_model  # per call: not the whole metadata()
        return name == served and version in ("", served_version)

    async def not_found(context: Any, name: str, version: str) -> None:
        meta = service.metadata()
        asked = name if not version else f"{name} version {version}"
        await context.abort(
            grpc.StatusCode.NOT_FOUND,
            f"unknown model {asked[:140]!r}; valid: {meta['model']} (version {meta['version']})",
        )

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (the proto's names)
            return pb.ServerLiveResponse(live=True)

        async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ServerReadyResponse(ready=service.__is_ready__())

        async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ModelReadyResponse(
                ready=known(request.name, request.version) and service.__is_ready__()
            )

        async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.ServerMetadataResponse(**server_metadata())

        async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
            if not known(request.name, request.version):
                await not_found(context, request.name, request.version)
            meta = model_metadata(service)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(**t) for t in meta["inputs"]],
                outputs=[tensor(**t) for t in meta["outputs"]],
            )

        async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
            if not known(request.model_name, request.model_version):
                await not_found(context, request.model_name, request.model_version)
            if in_flight.locked():  # as BentoML's max_concurrency answers HTTP with 429
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Too many requests")
            async with in_flight:
                try:
                    return await asyncio.wait_for(self._infer(request), service.settings.timeout)
                except asyncio.TimeoutError:
                    message = f"Not able to process the request in {service.settings.timeout} seconds"
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, message)
                except Exception as exc:  # the one mapping (and count) of errors, as on REST
                    answer = error_response(exc, service.metrics)
                    code = grpc.StatusCode.INVALID_ARGUMENT
                    if answer.status_code == 503:
                        code = grpc.StatusCode.UNAVAILABLE
                    elif answer.status_code >= 500:
                        code = grpc.StatusCode.INTERNAL
                    import orjson

                    await context.abort(code, orjson.loads(bytes(answer.body))["error"])
            raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

        async def _infer(self, request: Any) -> Any:
            settings = service.settings

            def decode() -> InferRequest:
                payload, binary = as_rest(request)
                return parse_infer_request(
                    payload,
                    binary,
                    service.input_spec,
                    settings.max_batch,  # gRPC data is never JSON text: max_batch either way
                    settings.max_batch,
                    available_outputs(service.graph_outputs),
                )

            # a big request is converted and checked off the event loop, as /predict's
            big = request.ByteSize() >= THREAD_BYTES
            parsed = decode() if not big else await asyncio.get_running_loop().run_in_executor(None, decode)
            decided = await service.decide_batch(parsed.pixels, parsed.operating_point, parsed.request_ids)
            arrays = output_arrays(decided, service.class_names)
            response = pb.ModelInferResponse(model_name=decided.model, model_version=decided.version)
            if parsed.id is not None:
                response.id = parsed.id
            point = decided.decisions.point
            for key, value in (
                ("operating_point", point.name),
                ("threshold", float(point.threshold)),
                ("score", point.score),
            ):
                _set_parameter(response.parameters[key], value)
            # every output as raw_output_contents, as Triton answers tritonclient.grpc
            for name, datatype, shape, blob in encode_tensors(parsed, arrays):
                response.outputs.add(name=name, datatype=datatype, shape=shape)
                response.raw_output_contents.append(blob)
            return response

    return Servicer()


async def start(service: ServiceContract, port: int, host: str) -> Any:
    """Start the gRPC server of this worker on its running event loop; return it (``stop`` it).

    Raises ``RuntimeError`` (:data:`MISSING`) without grpcio or tritonclient's stubs."""
    try:
        import grpc
        from tritonclient.grpc import service_pb2_grpc
    except ImportError as exc:
        raise RuntimeError(f"{MISSING} ({exc})") from None
    limit = service.max_body_bytes(npy=True)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", max(limit, 64 * 1024 * 1024)),
            ("grpc.so_reuseport", 1),  # the default on Linux; said here because the workers rely on it
        ]
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer(service), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"could not bind the gRPC port {host}:{port} (ABSTAIN_GRPC_PORT)")
    await server.start()
    log.info("Open Inference Protocol gRPC on %s:%d", host, port)
    return server
