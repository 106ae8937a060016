"""kvroute.bench (in progress)."""

__all__: list[str] = []
