"""`kvroute relay`: a sidecar that republishes one engine's KV events and replay over ZeroMQ
CURVE to allow-listed gateways, frames unchanged."""

from kvroute.relay.allow_list import AllowList
from kvroute.relay.counters import HandshakeOutcome, RelayCounters, RelayReplayOutcome
from kvroute.relay.relay import Relay, RelayConfig

__all__ = [
    "AllowList",
    "HandshakeOutcome",
    "Relay",
    "RelayConfig",
    "RelayCounters",
    "RelayReplayOutcome",
]
