"""Engine specs and the YAML fleet file (docs/architecture.md), validated field by field."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kvroute.core import SourceSpec
from kvroute.errors import ConfigError

__all__ = ["EngineSpec", "load_fleet_file", "offset_endpoint", "parse_fleet"]

_ENGINE_KEYS = (
    "name",
    "model",
    "url",
    "events",
    "replay",
    "topic",
    "dp_ranks",
    "lora",
    "curve_server_key",
)
_REQUIRED = ("name", "model", "url")
# A CURVE public key in Z85 (ZeroMQ RFC 32): 40 characters of its alphabet, 32 bytes.
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
_TCP = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]*]+):(?P<port>\d{1,5})$")


def offset_endpoint(endpoint: str, rank: int) -> str:
    """The endpoint of DP rank `rank`, as vLLM derives it: tcp port + rank,
    `inproc://x_dp{rank}`; rank 0 is unchanged. Other schemes cannot be offset (ConfigError)."""
    if rank == 0:
        return endpoint
    m = _TCP.match(endpoint)
    if m is not None:
        return f"tcp://{m['host']}:{int(m['port']) + rank}"
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    raise ConfigError(
        f"DP rank {rank}: expected a tcp:// or inproc:// endpoint to offset, got {endpoint!r}"
    )


@dataclass(frozen=True)
class EngineSpec:
    """One engine as the fleet file declares it; `events`/`replay` are DP rank 0's endpoints."""

    name: str
    model: str
    url: str
    events: str | None
    replay: str | None = None
    topic: str = ""
    dp_ranks: tuple[int, ...] = (0,)
    lora: tuple[str, ...] = ()
    curve_server_key: str | None = None  # Z85: subscribe as a CURVE client of this server

    def sources(self) -> list[SourceSpec]:
        """One subscriber source per DP rank (none when the engine publishes no events)."""
        if self.events is None:
            return []
        return [
            SourceSpec(
                engine=self.name,
                model=self.model,
                endpoint=offset_endpoint(self.events, rank),
                replay_endpoint=(
                    offset_endpoint(self.replay, rank) if self.replay is not None else None
                ),
                topic=self.topic,
                rank=rank,
                curve_server_key=self.curve_server_key,
            )
            for rank in self.dp_ranks
        ]


def load_fleet_file(path: Path) -> list[EngineSpec]:
    """Read and validate a fleet file; any problem raises ConfigError naming file, engine, field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the fleet file: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: expected YAML, got a syntax error: {exc}") from exc
    return parse_fleet(data, origin=str(path))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def parse_fleet(data: Any, *, origin: str = "<fleet>") -> list[EngineSpec]:
    """Validate an already-parsed fleet document (`{"engines": [...]}`) into EngineSpecs."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{origin}: expected a mapping with key 'engines', got {_describe(data)}")
    unknown = sorted(str(k) for k in data if k != "engines")
    if unknown:
        raise ConfigError(f"{origin}: unknown top-level key(s) {unknown}; expected only 'engines'")
    engines = data.get("engines")
    if not isinstance(engines, list):
        raise ConfigError(f"{origin}: field 'engines': expected a list, got {_describe(engines)}")
    specs: list[EngineSpec] = []
    seen: dict[str, int] = {}
    # Every socket address any rank of any engine uses, so two never share one: with DP,
    # vLLM's defaults (events 5557, replay 5558) collide at rank 1, and vLLM fails to bind.
    used: dict[str, tuple[str, str]] = {}
    for i, entry in enumerate(engines):
        spec = _parse_engine(entry, origin, i)
        where = f"{origin}: engine {spec.name!r} (#{i})"
        if spec.name in seen:
            raise ConfigError(
                f"{where}: field 'name': expected a unique name, "
                f"got a duplicate of engine #{seen[spec.name]}"
            )
        seen[spec.name] = i
        for field_name, endpoint in (("events", spec.events), ("replay", spec.replay)):
            if endpoint is None:
                continue
            for rank in spec.dp_ranks:
                address = offset_endpoint(endpoint, rank)
                if address in used:
                    other_engine, other_field = used[address]
                    raise ConfigError(
                        f"{where}: field {field_name!r}: expected endpoints no other socket "
                        f"uses, got {address} for DP rank {rank}, also the {other_field!r} "
                        f"endpoint of engine {other_engine!r} (rank r uses port + r)"
                    )
                used[address] = (spec.name, field_name)
        specs.append(spec)
    return specs


class _EngineFields:
    """Validates one engine entry; errors name the file, the engine and the field."""

    def __init__(self, entry: Mapping[Any, Any], origin: str, index: int) -> None:
        self.entry = entry
        name = entry.get("name")
        who = f"{name!r} (#{index})" if isinstance(name, str) and name else f"#{index}"
        self.where = f"{origin}: engine {who}"

    def fail(self, field: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(
            f"{self.where}: field {field!r}: expected {expected}, got {_describe(got)}"
        )

    def text(self, field: str) -> str:
        value = self.entry.get(field)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, "a non-empty string", value)
        return value

    def optional_text(self, field: str) -> str | None:
        if self.entry.get(field) is None:
            return None
        return self.text(field)

    def url(self) -> str:
        value = self.text("url")
        parts = urlsplit(value)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            raise self.fail("url", "an http(s)://host[:port] base URL", value)
        if parts.query or parts.fragment:
            raise self.fail("url", "a base URL without query or fragment", value)
        if parts.path.rstrip("/").endswith("/v1"):
            # The OpenAI SDK's base_url habit: kvroute adds /v1/... and /health itself, so this
            # would probe /v1/health (404) and eject every engine.
            trimmed = value.rstrip("/")[: -len("/v1")]
            raise self.fail("url", f"the engine's base URL without /v1 (write {trimmed!r})", value)
        return value.rstrip("/")

    def endpoint(self, field: str, max_rank: int) -> str | None:
        value = self.optional_text(field)
        if value is None:
            return None
        m = _TCP.match(value)
        if m is not None:
            port = int(m["port"])
            if not 0 < port <= 65535 - max_rank:
                raise self.fail(field, f"a tcp port in 1..{65535 - max_rank} (+ DP rank)", value)
            return value
        if value.startswith("inproc://") and len(value) > len("inproc://"):
            return value
        if value.startswith("ipc://") and len(value) > len("ipc://"):
            if max_rank > 0:
                expected = "tcp:// or inproc:// (ipc:// cannot be offset by DP rank)"
                raise self.fail(field, expected, value)
            return value
        raise self.fail(field, "a connect address tcp://host:port (no '*')", value)

    def curve_key(self) -> str | None:
        value = self.entry.get("curve_server_key")
        if value is None:
            return None
        if not isinstance(value, str) or not _Z85_KEY.match(value.strip()):
            raise self.fail(
                "curve_server_key", "a 40-character Z85 CURVE public key (kvroute keys)", value
            )
        return value.strip()

    def ranks(self) -> tuple[int, ...]:
        value = self.entry.get("dp_ranks", [0])
        if not isinstance(value, list) or not value:
            raise self.fail("dp_ranks", "a non-empty list of ints >= 0", value)
        for r in value:
            if type(r) is not int or r < 0:
                raise self.fail("dp_ranks", "a non-empty list of ints >= 0", r)
        if len(set(value)) != len(value):
            raise self.fail("dp_ranks", "distinct ranks", value)
        return tuple(value)

    def loras(self) -> tuple[str, ...]:
        value = self.entry.get("lora", [])
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail("lora", "a list of adapter names", value)
        for name in value:
            if not isinstance(name, str) or not name.strip():
                raise self.fail("lora", "a list of non-empty adapter names", name)
        if len(set(value)) != len(value):
            raise self.fail("lora", "distinct adapter names", value)
        return tuple(value)


def _parse_engine(entry: Any, origin: str, index: int) -> EngineSpec:
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f"{origin}: engine #{index}: expected a mapping of fields, got {_describe(entry)}"
        )
    fields = _EngineFields(entry, origin, index)
    unknown = sorted(str(k) for k in entry if k not in _ENGINE_KEYS)
    if unknown:
        raise ConfigError(
            f"{fields.where}: unknown field(s) {unknown}; expected only {list(_ENGINE_KEYS)}"
        )
    for key in _REQUIRED:
        if key not in entry:
            raise ConfigError(f"{fields.where}: field {key!r}: required, but missing")
    name, model = fields.text("name"), fields.text("model")
    ranks = fields.ranks()
    lora = fields.loras()
    if model in lora:
        raise fields.fail("lora", "adapter names other than the model's own name", model)
    topic = entry.get("topic")
    if topic is not None and not isinstance(topic, str):
        raise fields.fail("topic", "a string", topic)
    return EngineSpec(
        name=name,
        model=model,
        url=fields.url(),
        events=fields.endpoint("events", max(ranks)),
        replay=fields.endpoint("replay", max(ranks)),
        topic=topic if topic is not None else "",
        dp_ranks=ranks,
        lora=lora,
        curve_server_key=fields.curve_key(),
    )
