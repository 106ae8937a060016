"""kvroute.routing (in progress)."""

__all__: list[str] = []
