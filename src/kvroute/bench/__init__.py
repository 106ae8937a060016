"""Benchmarks, the demo workload and their reports; run by `kvroute bench` and `kvroute demo`,
never imported by the service."""

__all__: list[str] = []
