"""Bearer-token protection of the gateway's operator endpoints (`/v1/route`, `/debug/*`, and
`/metrics` when asked): the token is read from a file, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from kvroute.errors import ConfigError, GatewayHTTPError

__all__ = ["Handler", "load_token", "require_bearer"]

Handler = Callable[[Request], Awaitable[Response]]


def load_token(path: Path, setting: str = "admin_token_file") -> bytes:
    """The token in `path` (surrounding whitespace dropped, as a Kubernetes secret mounted as a
    file often ends in a newline); a missing, unreadable or empty file is a ConfigError naming
    `setting`."""
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {str(path)!r} ({exc})") from exc
    if not token:
        raise ConfigError(f"{setting}: {str(path)!r} is empty")
    return token


def require_bearer(handler: Handler, token: bytes) -> Handler:
    """`handler`, answering 401 (OpenAI-shaped) unless the request says `Authorization: Bearer
    <token>`."""
    expected = b"Bearer " + token

    async def guarded(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, expected):
            raise GatewayHTTPError(
                401,
                "Authorization: expected 'Bearer <token>' with the gateway's admin token "
                "(admin_token_file)",
                type="authentication_error",
                code="invalid_api_key",
            )
        return await handler(request)

    return guarded
