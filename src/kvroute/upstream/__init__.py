"""Engine HTTP clients: `HttpxEngineClient` implements `kvroute.core.EngineClient`; the one place
kvroute imports httpx and turns its errors into kvroute's (docs/architecture.md)."""

from kvroute.upstream.httpx_client import HttpxEngineClient

__all__ = ["HttpxEngineClient"]
