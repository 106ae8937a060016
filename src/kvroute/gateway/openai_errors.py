"""Error responses in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from starlette.responses import JSONResponse

from kvroute.errors import GatewayHTTPError

__all__ = ["http_error_response", "no_healthy_engine"]


def http_error_response(exc: GatewayHTTPError) -> JSONResponse:
    """The answer a GatewayHTTPError (kvroute/errors.py) stands for."""
    error = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    return JSONResponse({"error": error}, status_code=exc.status)


def no_healthy_engine(model: str, detail: str = "") -> GatewayHTTPError:
    """The 503 for a model whose engines are all ejected (or gone)."""
    return GatewayHTTPError(
        503,
        f"no healthy engine serves {model!r}{detail}",
        type="service_unavailable_error",
        code="no_healthy_engine",
    )
