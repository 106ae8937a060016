"""The engine registry: fleet file or other source → engines, their sources, health and load."""

from kvroute.fleet.registry import ChangeCallback, EngineState, Fleet
from kvroute.fleet.scrape import (
    KV_CACHE_USAGE,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    parse_vllm_gauges,
)
from kvroute.fleet.source import FileFleetSource, FleetSource
from kvroute.fleet.spec import EngineSpec, load_fleet_file, offset_endpoint, parse_fleet

__all__ = [
    "KV_CACHE_USAGE",
    "NUM_REQUESTS_RUNNING",
    "NUM_REQUESTS_WAITING",
    "ChangeCallback",
    "EngineSpec",
    "EngineState",
    "FileFleetSource",
    "Fleet",
    "FleetSource",
    "load_fleet_file",
    "offset_endpoint",
    "parse_fleet",
    "parse_vllm_gauges",
]
