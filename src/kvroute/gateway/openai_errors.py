"""Error responses in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from starlette.responses import JSONResponse

from kvroute.errors import GatewayHTTPError

__all__ = ["error_body", "http_error_response", "no_healthy_engine"]


def error_body(exc: GatewayHTTPError) -> dict[str, object]:
    """The JSON body a GatewayHTTPError (kvroute/errors.py) stands for, wherever it is sent."""
    return {
        "error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    }


# A body too slow to arrive: the connection is closed after the answer instead of waiting for
# the rest. (After a 413 the server reads the rest and throws it away: closing with unread data
# would reset the connection, and the client would see that instead of the 413.)
_UNREAD_BODY = frozenset({408})


def http_error_response(exc: GatewayHTTPError) -> JSONResponse:
    """The answer a GatewayHTTPError stands for, from the gateway's own HTTP server."""
    headers = {"connection": "close"} if exc.status in _UNREAD_BODY else None
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


def no_healthy_engine(model: str | None, detail: str = "") -> GatewayHTTPError:
    """The 503 for a model whose engines are all ejected (or gone); `model` None: any model."""
    serves = "" if model is None else f" serves {model!r}"
    return GatewayHTTPError(
        503,
        f"no healthy engine{serves}{detail}",
        type="service_unavailable_error",
        code="no_healthy_engine",
    )
