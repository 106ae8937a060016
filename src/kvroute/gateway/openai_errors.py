"""Error responses in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from starlette.responses import JSONResponse

from kvroute.errors import GatewayHTTPError

__all__ = ["error_response", "http_error_response", "no_healthy_engine"]


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def http_error_response(exc: GatewayHTTPError) -> JSONResponse:
    """The answer a handler's GatewayHTTPError (kvroute/errors.py) stands for."""
    return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)


def no_healthy_engine(model: str, detail: str = "") -> GatewayHTTPError:
    """The 503 for a model whose engines are all ejected (or gone)."""
    return GatewayHTTPError(
        503,
        f"no healthy engine serves {model!r}{detail}",
        type="service_unavailable_error",
        code="no_healthy_engine",
    )
