"""The `kvroute serve` subcommand: settings from the environment and flags, then uvicorn."""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Any

from kvroute.core import LoadSource, PolicyName
from kvroute.errors import ConfigError

__all__ = ["register"]


def register(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible KV-aware gateway in front of a fleet",
        description="Settings come from KVROUTE_* environment variables; flags override them.",
    )
    serve.add_argument(
        "--fleet",
        type=Path,
        help="fleet YAML file (KVROUTE_FLEET_FILE; default: none, then --k8s-namespace is needed)",
    )
    serve.add_argument(
        "--picker-port",
        type=int,
        help="also serve the Envoy ext_proc endpoint picker on this port (KVROUTE_PICKER_PORT; "
        "default: none, no picker)",
    )
    serve.add_argument(
        "--k8s-namespace",
        help="discover engines as the Ready pods of this namespace (KVROUTE_K8S_NAMESPACE; "
        "default: none, the fleet file only)",
    )
    serve.add_argument(
        "--policy",
        choices=[p.value for p in PolicyName],
        help="routing policy (KVROUTE_POLICY, default kv_aware)",
    )
    serve.add_argument(
        "--load-source",
        choices=[s.value for s in LoadSource],
        help="what counts as an engine's load (KVROUTE_LOAD_SOURCE, default blended)",
    )
    serve.add_argument(
        "--shared-state-url",
        help="Redis or Valkey URL shared by several replicas (KVROUTE_SHARED_STATE_URL; "
        "default: none, one replica's own view)",
    )
    serve.add_argument(
        "--snapshot-path",
        type=Path,
        help="write the index here periodically and load it at start (KVROUTE_SNAPSHOT_PATH; "
        "default: none, every start is cold)",
    )
    serve.add_argument("--host", help="listen address (KVROUTE_HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="listen port (KVROUTE_PORT, default 8080)")
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log level (KVROUTE_LOG_LEVEL, default info)",
    )
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from kvroute.fleet import load_fleet_file
    from kvroute.gateway.app import create_app, curve_keys
    from kvroute.gateway.log_format import configure_logging
    from kvroute.gateway.server import ServerOptions, listen, serve_forever
    from kvroute.metrics import Metrics
    from kvroute.settings import load_settings

    overrides = {
        name: value
        for name, value in (
            ("fleet_file", args.fleet),
            ("k8s_namespace", args.k8s_namespace),
            ("picker_port", args.picker_port),
            ("policy", args.policy),
            ("load_source", args.load_source),
            ("shared_state_url", args.shared_state_url),
            ("snapshot_path", args.snapshot_path),
            ("host", args.host),
            ("port", args.port),
            ("log_level", args.log_level),
        )
        if value is not None
    }
    try:
        settings = load_settings(**overrides)
        if settings.fleet_file is None and settings.k8s_namespace is None:
            raise ConfigError(
                "fleet: expected --fleet (KVROUTE_FLEET_FILE) or --k8s-namespace "
                "(KVROUTE_K8S_NAMESPACE), got neither"
            )
        if settings.fleet_file is not None:
            # A bad file, or CURVE keys it needs and the gateway lacks: before binding the port.
            curve_keys(settings, load_fleet_file(settings.fleet_file))
    except ConfigError as exc:
        print(f"kvroute serve: {exc}", file=sys.stderr)
        return 2
    metrics = Metrics()
    options = ServerOptions(
        tls_cert_file=settings.tls_cert_file,
        tls_key_file=settings.tls_key_file,
        max_connections=settings.max_connections,
        keep_alive_timeout_s=settings.keep_alive_timeout_s,
        header_timeout_s=settings.header_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        on_header_timeout=metrics.http_timeouts.labels(phase="header").inc,
        event_loop=settings.event_loop,
    )
    if options.tls_cert_file is not None:
        for path in (options.tls_cert_file, options.tls_key_file):
            if path is None or not path.is_file():
                print(f"kvroute serve: TLS file {path} is not a readable file", file=sys.stderr)
                return 2
    try:
        app = create_app(settings, metrics=metrics)  # reads the token files; starts nothing
    except ConfigError as exc:
        print(f"kvroute serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # The port before anything starts (subscribers, snapshot, discovery): uvicorn would bind it
    # only after the app's start-up, and report a port in use then.
    try:
        sockets = listen(settings.host, settings.port)
    except OSError as exc:
        print(_cannot_listen(exc, "--port / KVROUTE_PORT"), file=sys.stderr)
        return 2
    if settings.picker_port:  # not None (off) nor 0 (a free port)
        # gRPC takes no socket: it binds the picker's port first thing in the app's start-up.
        # Trying it here reports a taken port the way the HTTP port's is.
        try:
            for probe in listen(settings.host, settings.picker_port):
                probe.close()
        except OSError as exc:
            for sock in sockets:
                sock.close()
            setting = "--picker-port / KVROUTE_PICKER_PORT"
            print(_cannot_listen(exc, setting, "endpoint picker: "), file=sys.stderr)
            return 2
    return serve_forever(
        app, settings.host, settings.port, settings.log_level, options, sockets=sockets
    )


def _cannot_listen(exc: OSError, setting: str, what: str = "") -> str:
    """One line for a port that cannot be bound: `listen`'s message names the address."""
    message = f"kvroute serve: {what}{exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        message += f" (another kvroute or engine there? set {setting})"
    return message
