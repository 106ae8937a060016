"""kvroute.fleet (in progress)."""

__all__: list[str] = []
