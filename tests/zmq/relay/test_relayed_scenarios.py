"""The subscriber scenarios of tests/zmq/events, rerun with every publisher behind a `kvroute
relay` and every subscriber a CURVE client: a relayed engine ingests exactly as a direct one.

The test functions (and their fixtures) are imported, so pytest collects them again here; the
autouse fixture puts a relay in front of every feed (tests/event_harness.py `RelayTransport`).
Scenarios that drive a bare socket instead of a feed stay direct: they test the parser.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.event_harness import RelayTransport
from tests.zmq.events.test_subscriber import *  # noqa: F403
from tests.zmq.events.test_subscriber_limits import *  # noqa: F403
from tests.zmq.events.test_subscriber_receive import *  # noqa: F403
from tests.zmq.events.test_subscriber_regressions import *  # noqa: F403


@pytest.fixture(autouse=True)
def _through_a_relay(relayed: RelayTransport) -> Iterator[None]:
    yield
    # The gateway side always holds an allow-listed key and the right server key.
    for relay in relayed.relays:
        assert relay.counters.denied() == 0, relay.counters.handshakes
