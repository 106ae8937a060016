"""kvroute.sim: simulated vLLM engines (block pool, scheduler, HTTP API, real-wire KV events)."""

from kvroute.sim.block_pool import BlockPool, CachedBlock
from kvroute.sim.engine import Generation, SimConfig, SimEngine
from kvroute.sim.fleet import PORT_STRIDE, SimFleet
from kvroute.sim.scheduler import SchedulerConfig, SimRequest, SimScheduler, StepOutcome
from kvroute.sim.server import create_engine_app
from kvroute.sim.tokenizer import SimTokenizer

__all__ = [
    "PORT_STRIDE",
    "BlockPool",
    "CachedBlock",
    "Generation",
    "SchedulerConfig",
    "SimConfig",
    "SimEngine",
    "SimFleet",
    "SimRequest",
    "SimScheduler",
    "SimTokenizer",
    "StepOutcome",
    "create_engine_app",
]
