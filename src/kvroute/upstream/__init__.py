"""Engine HTTP clients: `HttpxEngineClient` implements `kvroute.core.EngineClient`; the one place
kvroute imports httpx and turns its errors into kvroute's (STYLE.md §10)."""

from kvroute.upstream.httpx_client import HttpxEngineClient

__all__ = ["HttpxEngineClient"]
