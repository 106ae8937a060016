"""The engine registry: fleet file or other source → engines, their sources, health and load."""

from kvroute.fleet.load import EngineLoad, LoadView, blend_load
from kvroute.fleet.registry import ChangeCallback, EngineState, Fleet
from kvroute.fleet.scrape import (
    KV_CACHE_USAGE,
    KV_POOL_BLOCKS,
    NUM_REQUESTS_RUNNING,
    NUM_REQUESTS_WAITING,
    parse_vllm_gauges,
    scan_vllm_gauges,
)
from kvroute.fleet.shared_claim import SpeculativeClaim
from kvroute.fleet.source import FileFleetSource, FleetSource
from kvroute.fleet.spec import EngineSpec, load_fleet_file, offset_endpoint, parse_fleet

__all__ = [
    "KV_CACHE_USAGE",
    "KV_POOL_BLOCKS",
    "NUM_REQUESTS_RUNNING",
    "NUM_REQUESTS_WAITING",
    "ChangeCallback",
    "EngineLoad",
    "EngineSpec",
    "EngineState",
    "FileFleetSource",
    "Fleet",
    "FleetSource",
    "LoadView",
    "SpeculativeClaim",
    "blend_load",
    "load_fleet_file",
    "offset_endpoint",
    "parse_fleet",
    "parse_vllm_gauges",
    "scan_vllm_gauges",
]
