"""The relay's small HTTP endpoint on the asyncio loop: `GET /metrics` (Prometheus text) and
`GET /healthz`; anything else is a 404."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

__all__ = ["serve_metrics"]

_MAX_REQUEST_BYTES: Final = 8192
_READ_TIMEOUT_S: Final = 5.0


async def serve_metrics(
    host: str, port: int, render: Callable[[], tuple[bytes, str]]
) -> asyncio.Server:
    """Listen on host:port; each connection gets one response, then is closed."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            parts = head.split(b" ", 2)
            path = parts[1].split(b"?", 1)[0] if len(parts) >= 2 else b""
            if parts[0] == b"GET" and path == b"/metrics":
                body, content_type = render()
                status = b"200 OK"
            elif parts[0] == b"GET" and path == b"/healthz":
                body, content_type, status = b"ok\n", "text/plain", b"200 OK"
            else:
                body, content_type, status = b"not found\n", "text/plain", b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type.encode()
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + body
            )  # fmt: skip
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a slow, cut or oversized request: closed without an answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=_MAX_REQUEST_BYTES)
