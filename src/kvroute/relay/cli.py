"""The `kvroute relay` and `kvroute keys generate` subcommands: argument parsing and wiring."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Final

from kvroute.errors import ConfigError
from kvroute.events.curve import load_curve_key_pair, write_curve_key_pair
from kvroute.metrics import RelayMetrics
from kvroute.relay.http import serve_metrics
from kvroute.relay.relay import Relay, RelayConfig

__all__ = ["register"]

# RelayConfig's defaults, so each number is written once.
_DEFAULTS: Final = {f.name: f.default for f in dataclasses.fields(RelayConfig)}


def register(sub: Any) -> None:
    """Add `kvroute relay` and `kvroute keys` to the `kvroute` subcommands."""
    d = argparse.Namespace(**_DEFAULTS)
    p = sub.add_parser(
        "relay",
        help="republish one engine's KV events and replay over ZeroMQ CURVE (a sidecar)",
        description=(
            "Subscribe to an engine's KV-event PUB and replay ROUTER on loopback and republish "
            "both as CURVE servers: frames unchanged, only gateways whose public key is in "
            "--allow-dir get in. Gateways set the relay's public key as the engine's "
            "curve_server_key. Runs until SIGINT/SIGTERM."
        ),
    )
    p.add_argument(
        "--engine-events",
        default="tcp://127.0.0.1:5557",
        help="the engine's event PUB to connect to",
    )
    p.add_argument(
        "--engine-replay",
        default=None,
        help="the engine's replay ROUTER, e.g. tcp://127.0.0.1:5558 (default: none, no replay)",
    )
    p.add_argument(
        "--bind-events",
        default="tcp://*:15557",
        help="where gateways subscribe (CURVE PUB)",
    )
    p.add_argument(
        "--bind-replay",
        default=None,
        help="where gateways ask for replay (CURVE ROUTER), e.g. tcp://*:15558; "
        "needs --engine-replay (default: none, no replay)",
    )
    p.add_argument(
        "--secret-key-file",
        type=Path,
        required=True,
        help="the relay's key pair (kvroute keys generate: NAME.key_secret)",
    )
    p.add_argument(
        "--allow-dir",
        type=Path,
        required=True,
        help="directory of allowed gateways' public key files (*.key), reread when it changes",
    )
    p.add_argument(
        "--allow-reload-s",
        type=float,
        default=d.allow_reload_s,
        help="seconds between checks of --allow-dir",
    )
    p.add_argument(
        "--max-replays",
        type=int,
        default=d.max_replays,
        help="replays in flight at once; more are refused",
    )
    p.add_argument(
        "--replay-timeout-s",
        type=float,
        default=d.replay_timeout_s,
        help="longest replay through the relay, seconds",
    )
    p.add_argument(
        "--hwm",
        type=int,
        default=d.hwm,
        help="messages queued per socket before dropping",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics and /healthz on this port (default: off)",
    )
    p.add_argument("--metrics-host", default="0.0.0.0", help="address of --metrics-port")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe log records written to stderr",
    )
    p.add_argument(
        "--log-format",
        default="kv",
        choices=["kv", "json"],
        help="log lines as key=value pairs (kv) or JSON objects (json)",
    )
    p.set_defaults(func=run)  # fmt: skip

    keys = sub.add_parser("keys", help="CURVE key pairs for the relay and gateways")
    keys_sub = keys.add_subparsers(
        dest="keys_command", metavar="ACTION", required=True, help="what to do"
    )
    gen = keys_sub.add_parser(
        "generate",
        help="write a key pair: NAME.key (public) and NAME.key_secret (mode 0600)",
        description="Write a new CURVE key pair in zmq.auth's certificate format: NAME.key "
        "(public: give it to the other side) and NAME.key_secret (both keys, mode 0600: keep it "
        "secret, e.g. in a Kubernetes secret). Prints the public key.",
    )
    gen.add_argument("--out", type=Path, required=True, help="directory to write into")
    gen.add_argument("--name", default="kvroute", help="file name stem: NAME.key, NAME.key_secret")
    gen.set_defaults(func=run_keys_generate)


def run_keys_generate(args: argparse.Namespace) -> int:
    """`kvroute keys generate`: exit 0 with the public key on stdout, 2 on a refusal."""
    try:
        public, secret = write_curve_key_pair(args.out, args.name)
        pair = load_curve_key_pair(secret, public)
    except (ConfigError, OSError) as exc:
        print(f"kvroute keys generate: {exc}", file=sys.stderr)
        return 2
    print(f"kvroute keys generate: wrote {public} and {secret} (0600)", file=sys.stderr)
    print(pair.public.decode())
    return 0


class _Formatter(logging.Formatter):
    """One line per record with the fields passed as `extra` (key=value, or JSON)."""

    _standard: Final = frozenset(
        vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
        | {"message", "asctime", "taskName"}
    )

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self._json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update((k, v) for k, v in vars(record).items() if k not in self._standard)
        if self._json:
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())


def _config(args: argparse.Namespace) -> RelayConfig:
    if (args.engine_replay is None) != (args.bind_replay is None):
        raise ConfigError("--engine-replay and --bind-replay: expected both or neither")
    return RelayConfig(
        engine_events=args.engine_events,
        bind_events=args.bind_events,
        keys=load_curve_key_pair(args.secret_key_file, what="--secret-key-file"),
        allow_dir=args.allow_dir,
        engine_replay=args.engine_replay,
        bind_replay=args.bind_replay,
        max_replays=args.max_replays,
        replay_timeout_s=args.replay_timeout_s,
        hwm=args.hwm,
        allow_reload_s=args.allow_reload_s,
    )


def run(args: argparse.Namespace) -> int:
    """`kvroute relay`: 2 on a configuration error, 0 after SIGINT/SIGTERM."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(args.log_format == "json"))
    root = logging.getLogger("kvroute")
    root.handlers[:] = [handler]
    root.setLevel(args.log_level.upper())
    root.propagate = False
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"kvroute relay: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(config, args.metrics_host, args.metrics_port))


async def _serve(config: RelayConfig, metrics_host: str, metrics_port: int | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        relay = Relay(config)
        await relay.start()
    except ConfigError as exc:
        print(f"kvroute relay: {exc}", file=sys.stderr)
        return 2
    server: asyncio.Server | None = None
    try:
        if metrics_port is not None:
            server = await serve_metrics(
                metrics_host, metrics_port, RelayMetrics(relay.counters).render
            )
        print(
            f"kvroute relay: events {relay.events_endpoint}"
            + (f", replay {relay.replay_endpoint}" if relay.replay_endpoint else "")
            + f"; server key {config.keys.public.decode()}",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
    except OSError as exc:
        print(f"kvroute relay: --metrics-port {metrics_port}: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        await relay.close()
    return 0
