"""kvroute.sim (in progress)."""

__all__: list[str] = []
