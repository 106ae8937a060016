"""kvroute.tokenize (in progress)."""

__all__: list[str] = []
