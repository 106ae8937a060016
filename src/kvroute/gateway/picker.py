"""The endpoint picker: an Envoy ext_proc gRPC service (Gateway API Inference Extension protocol)
that routes each request with the gateway's index and policy and names the chosen endpoint."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import urlsplit

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvroute.errors import GatewayHTTPError
from kvroute.gateway.openai_body import RequestKind
from kvroute.gateway.openai_errors import error_body, no_healthy_engine
from kvroute.gateway.proxy import ENGINE_HEADER
from kvroute.gateway.service import Gateway

__all__ = [
    "DESTINATION_HEADER",
    "HEALTH_SERVICES",
    "METADATA_NAMESPACE",
    "EndpointPicker",
    "PickerServer",
]

log = logging.getLogger("kvroute.gateway.picker")

# The protocol's names (docs/notes/issue-11-research.md §D): the chosen `ip:port` goes in this
# request header and, with the same value, in dynamic metadata under this namespace.
DESTINATION_HEADER: Final = "x-gateway-destination-endpoint"
METADATA_NAMESPACE: Final = "envoy.lb"
_OVERWRITE: Final = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_KINDS: Final = {
    "/v1/completions": RequestKind.COMPLETION,
    "/v1/chat/completions": RequestKind.CHAT,
}


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # Overwrite: a client may send the destination header itself (it is not sanitised).
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
    )


def _status(headers: ext_proc.HttpHeaders) -> int:
    """The `:status` of response headers; 0 when absent or not a number."""
    for h in headers.headers.headers:
        if h.key == ":status":
            value = (h.raw_value or h.value.encode()).decode("ascii", "replace")
            return int(value) if value.isdigit() else 0
    return 0


def _endpoint(url: str) -> str:
    """`host:port` of an engine's base URL, as an ORIGINAL_DST cluster connects to it."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _error(exc: GatewayHTTPError) -> ext_proc.ProcessingResponse:
    """An OpenAI-shaped error answered by Envoy itself (the request goes nowhere)."""
    return ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=exc.status),
            headers=ext_proc.HeaderMutation(
                set_headers=[_header("content-type", "application/json")]
            ),
            body=json.dumps(error_body(exc)).encode(),
            details=exc.code or exc.type,
        )
    )


class EndpointPicker(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Per request: on the buffered body, route as `/v1/route` would (resolve, tokenize, match,
    choose) and set the destination header and metadata; the request counts as in flight to
    that engine (and its prompt as speculative there) until the stream ends, after the response.
    A request the gateway cannot route gets its OpenAI error as an immediate response."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def Process(
        self, requests: AsyncIterator[ext_proc.ProcessingRequest], context: Any
    ) -> AsyncIterator[ext_proc.ProcessingResponse]:
        gateway = self._gateway
        path = ""
        engine: str | None = None
        tokens = 0
        try:
            async for message in requests:
                phase = message.WhichOneof("request")
                if phase == "request_headers":
                    headers = {
                        h.key: (h.raw_value or h.value.encode()).decode("utf-8", "replace")
                        for h in message.request_headers.headers.headers
                    }
                    path = headers.get(":path", "").split("?", 1)[0]
                    if not message.request_headers.end_of_stream:
                        yield ext_proc.ProcessingResponse(
                            request_headers=ext_proc.HeadersResponse()
                        )
                        continue
                    engine = gateway.least_loaded_engine()  # no body to route by
                    if engine is None:
                        yield _error(no_healthy_engine(None))
                        return
                    gateway.begin_request(engine, 0)
                    yield self._destination(engine, headers_phase=True)
                elif phase == "request_body":
                    kind = _KINDS.get(path)
                    try:
                        if kind is None:
                            raise GatewayHTTPError(
                                404, f"{path}: not routed by the picker", code="not_found"
                            )
                        prepared = await gateway.prepare(kind, message.request_body.body)
                        req = prepared.request
                        outcome = await gateway.route(req, prepared.token_ids)
                    except GatewayHTTPError as exc:
                        yield _error(exc)
                        return
                    engine = outcome.decision.engine
                    tokens = outcome.prompt_tokens + req.max_tokens
                    gateway.begin_request(engine, tokens)
                    gateway.add_speculative(engine, outcome, req.cache_salt)
                    yield self._destination(engine, headers_phase=False)
                elif phase == "response_headers":
                    if engine is not None and 0 < _status(message.response_headers) < 400:
                        gateway.note_served(engine)
                    mutation = ext_proc.HeaderMutation(
                        set_headers=[_header(ENGINE_HEADER, engine)] if engine else []
                    )
                    yield ext_proc.ProcessingResponse(
                        response_headers=ext_proc.HeadersResponse(
                            response=ext_proc.CommonResponse(header_mutation=mutation)
                        )
                    )
                elif phase == "response_body":
                    yield ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse())
                elif phase == "request_trailers":
                    yield ext_proc.ProcessingResponse(request_trailers=ext_proc.TrailersResponse())
                elif phase == "response_trailers":
                    yield ext_proc.ProcessingResponse(response_trailers=ext_proc.TrailersResponse())
        finally:
            if engine is not None:
                gateway.end_request(engine, tokens)

    def _destination(self, engine: str, *, headers_phase: bool) -> ext_proc.ProcessingResponse:
        url = self._gateway.engine_url(engine) or ""
        endpoint = _endpoint(url)
        common = ext_proc.CommonResponse(
            header_mutation=ext_proc.HeaderMutation(
                set_headers=[_header(DESTINATION_HEADER, endpoint)]
            ),
            clear_route_cache=True,
        )
        metadata = struct_pb2.Struct()
        metadata.update({METADATA_NAMESPACE: {DESTINATION_HEADER: endpoint}})
        if headers_phase:
            return ext_proc.ProcessingResponse(
                request_headers=ext_proc.HeadersResponse(response=common), dynamic_metadata=metadata
            )
        return ext_proc.ProcessingResponse(
            request_body=ext_proc.BodyResponse(response=common), dynamic_metadata=metadata
        )


# gRPC health services the protocol asks an endpoint picker to expose (research notes §D).
HEALTH_SERVICES: Final = ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor")


class PickerServer:
    """The picker's gRPC server: its port is bound when it is made (0: a free port), before the
    gateway starts anything, and served from `start`, with the gRPC health protocol."""

    def __init__(self, host: str, port: int) -> None:
        # Without SO_REUSEPORT (gRPC's default on Linux), a second kvroute on this port fails to
        # bind instead of silently sharing its connections (measured).
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        try:
            self.port: int = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:  # gRPC's "Failed to bind to address"
            raise OSError(f"endpoint picker: cannot listen on {host}:{port}: {exc}") from None
        self._started = False

    async def start(self, gateway: Gateway) -> None:
        ext_proc_grpc.add_ExternalProcessorServicer_to_server(EndpointPicker(gateway), self._server)
        checks = health.aio.HealthServicer()
        for service in ("", *HEALTH_SERVICES):
            await checks.set(service, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checks, self._server)
        await self._server.start()
        self._started = True
        log.info("endpoint picker listening", extra={"port": self.port})

    async def stop(self, grace: float) -> None:
        if not self._started:
            # A gRPC server that never started keeps its port until started and stopped.
            await self._server.start()
            self._started = True
        await self._server.stop(grace)
