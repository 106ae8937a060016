"""Counts how the CURVE handshakes on a relay socket end, per reason, from its ZeroMQ monitor
(a client with no key, an unknown key or another server key never gets a message)."""

from __future__ import annotations

import logging
from typing import Final

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvroute.relay.counters import HandshakeOutcome, RelayCounters

__all__ = ["HANDSHAKE_EVENTS", "handshake_outcome", "watch_handshakes"]

log = logging.getLogger("kvroute.relay")

HANDSHAKE_EVENTS: Final = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def handshake_outcome(event: int, value: int) -> HandshakeOutcome | None:
    """The outcome a monitor event reports, or None for other events."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return HandshakeOutcome.OK
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return HandshakeOutcome.UNKNOWN_KEY  # the ZAP handler said no (status 400)
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return HandshakeOutcome.NO_KEY
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return HandshakeOutcome.WRONG_SERVER_KEY
        return HandshakeOutcome.OTHER
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return HandshakeOutcome.OTHER
    return None


async def watch_handshakes(
    monitor: zmq.asyncio.Socket, socket_name: str, counters: RelayCounters
) -> None:
    """Count every handshake `monitor` reports until cancelled (or the monitor closes)."""
    while True:
        try:
            frames = await monitor.recv_multipart()
        except zmq.ZMQError:
            return
        message = parse_monitor_message(frames)
        outcome = handshake_outcome(int(message["event"]), int(message["value"]))
        if outcome is None:
            continue
        counters.handshakes[(socket_name, outcome.value)] += 1
        if outcome is not HandshakeOutcome.OK:
            log.info(
                "relay: client handshake refused",
                extra={
                    "socket": socket_name,
                    "reason": outcome.value,
                    "endpoint": message["endpoint"].decode(errors="replace"),
                },
            )
