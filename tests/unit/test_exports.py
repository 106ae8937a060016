"""Every package's documented surface in one table, every package's `__all__` in its
`__init__.py`, and the one-job docstring every module opens with."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import kvroute

SRC = Path(kvroute.__file__).parent

EXPORTS: dict[str, list[str]] = {
    "kvroute": [
        "__version__",
    ],
    "kvroute.bench": [],
    "kvroute.core": [
        "AllBlocksCleared",
        "BlockRemoved",
        "BlockStored",
        "DropReason",
        "EngineClient",
        "EngineHash",
        "EngineResponse",
        "Event",
        "EventBatch",
        "EventCounters",
        "GPU",
        "IngestLimits",
        "LoadSource",
        "LocalHash",
        "MatchResult",
        "PolicyName",
        "ReplayOutcome",
        "ResetCause",
        "SourceId",
        "SourceSpec",
        "SourceStatus",
        "source_id",
    ],
    "kvroute.errors": [
        "ClientGone",
        "ConfigError",
        "EngineConnectError",
        "EngineError",
        "EngineResponseError",
        "GatewayHTTPError",
        "IndexStateError",
        "KvrouteError",
        "TokenizeError",
        "WireError",
    ],
    "kvroute.events": [
        "BatchDecoder",
        "CurveClientKeys",
        "CurveKeyPair",
        "END_SEQ",
        "RecoveryTimings",
        "ReplayKind",
        "ReplayRequest",
        "ReplayResult",
        "SUPPORTED_RELEASES",
        "SourceTracker",
        "SubscriberManager",
        "VllmAllBlocksCleared",
        "VllmBlockRemoved",
        "VllmBlockStored",
        "VllmEvent",
        "VllmEventBatch",
        "ZmqEventPublisher",
        "check_curve_key",
        "curve_client",
        "curve_server",
        "decode_batch",
        "decode_vllm",
        "encode_batch",
        "load_curve_key_pair",
        "load_curve_public_key",
        "normalise_batch",
        "parse_live_frames",
        "parse_replay_frames",
        "release_layout",
        "request_replay",
        "write_curve_key_pair",
    ],
    "kvroute.fleet": [
        "ChangeCallback",
        "EngineLoad",
        "EngineSpec",
        "EngineState",
        "FileFleetSource",
        "Fleet",
        "FleetSource",
        "KV_CACHE_USAGE",
        "KV_POOL_BLOCKS",
        "LoadView",
        "NUM_REQUESTS_RUNNING",
        "NUM_REQUESTS_WAITING",
        "SpeculativeClaim",
        "blend_load",
        "load_fleet_file",
        "offset_endpoint",
        "parse_fleet",
        "parse_vllm_gauges",
        "scan_vllm_gauges",
    ],
    "kvroute.gateway": [
        "BackgroundServer",
        "ENGINE_HEADER",
        "Gateway",
        "RouteOutcome",
        "ServerOptions",
        "create_app",
        "serve_forever",
    ],
    "kvroute.index": [
        "IndexLimits",
        "PrefixIndex",
        "chain_hashes",
        "create_index",
        "pack_tokens",
        "prompt_hashes",
        "seed_hash",
    ],
    "kvroute.persist": [
        "FORMAT_VERSION",
        "Payload",
        "RefuseReason",
        "Snapshot",
        "SnapshotError",
        "SnapshotInfo",
        "SnapshotRefused",
        "fleet_fingerprint",
        "read_snapshot",
        "remove_stale_temp_files",
        "write_snapshot",
    ],
    "kvroute.metrics": [
        "Metrics",
        "RelayMetrics",
    ],
    "kvroute.relay": [
        "AllowList",
        "HandshakeOutcome",
        "Relay",
        "RelayConfig",
        "RelayCounters",
        "RelayReplayOutcome",
    ],
    "kvroute.routing": [
        "Candidate",
        "CostWeights",
        "DEFAULT_EVICTING_WINDOW_S",
        "Decision",
        "EngineScore",
        "EvictionRecency",
        "GUARD_POLICY_NAME",
        "KvAwarePolicy",
        "LeastLoadedPolicy",
        "Policy",
        "RandomPolicy",
        "RoundRobinPolicy",
        "evicted_tokens",
        "kv_cost",
        "make_policy",
        "needs_tokens",
        "uncached_prefill",
    ],
    "kvroute.settings": [
        "ENV_PREFIX",
        "LogFormat",
        "Settings",
        "load_settings",
        "settings_env_names",
        "settings_markdown_table",
    ],
    "kvroute.sim": [
        "BlockPool",
        "CachedBlock",
        "Generation",
        "PORT_STRIDE",
        "SchedulerConfig",
        "SimConfig",
        "SimEngine",
        "SimFleet",
        "SimRequest",
        "SimScheduler",
        "SimTokenizer",
        "StepOutcome",
        "create_engine_app",
    ],
    "kvroute.tokenize": [
        "CachingTokenizer",
        "LocalTokenizer",
        "RemoteTokenizer",
        "Tokenizer",
    ],
    "kvroute.upstream": [
        "HttpxEngineClient",
    ],
}


def test_every_package_is_in_the_table() -> None:
    packages = {f"kvroute.{p.parent.name}" for p in SRC.glob("*/__init__.py")}
    assert packages <= EXPORTS.keys(), packages - EXPORTS.keys()


@pytest.mark.parametrize("module_name", sorted(EXPORTS))
def test_all_lists_the_public_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported: list[str] = module.__all__
    for name in exported:
        assert hasattr(module, name), f"{module_name}.{name}"
    assert sorted(exported) == EXPORTS[module_name]


def test_every_package_lists_all_in_its_init() -> None:
    for init in SRC.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        assigned = {
            t.id
            for node in tree.body
            if isinstance(node, ast.Assign | ast.AnnAssign)
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(t, ast.Name)
        }
        assert "__all__" in assigned, init


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")), ids=str
)
def test_every_module_opens_with_a_docstring_of_at_most_two_lines(path: str) -> None:
    docstring = ast.get_docstring(ast.parse((SRC / path).read_text()))
    assert docstring, f"{path}: no module docstring"
    if path == "errors.py":
        return  # its docstring draws the exception tree
    assert len(docstring.splitlines()) <= 2, f"{path}: {docstring!r}"
