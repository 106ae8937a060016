"""Every drop reason and reset cause is triggered through a running gateway and found on its
`/metrics` (docs/architecture.md "Metrics"): real sockets, our publisher, a bare PUB socket."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import yaml
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from kvroute.core import DropReason, ResetCause, source_id
from kvroute.events import (
    VllmAllBlocksCleared,
    VllmBlockRemoved,
    VllmBlockStored,
    VllmEventBatch,
    encode_batch,
    normalise_batch,
)
from kvroute.gateway import BackgroundServer, Gateway, create_app
from kvroute.metrics import Metrics
from kvroute.settings import load_settings
from tests.event_harness import MODEL, applied, start_feed
from tests.event_streams import BLOCK_SIZE, EngineStream
from tests.polling import eventually

MAX_BLOCKS_PER_SOURCE = 64
MAX_BATCH_BLOCKS = 1_000
DEADLINE_S = 15.0


def _labels(text: str, family: str, label: str) -> dict[str, float]:
    """Total of `family` per value of `label`, over every source."""
    out: dict[str, float] = {}
    for metric in text_string_to_metric_families(text):
        if metric.name != family:
            continue
        for sample in metric.samples:
            if sample.name == family + "_total":
                key = sample.labels[label]
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _stored(n_blocks: int, first_hash: int, **fields: object) -> VllmBlockStored:
    return VllmBlockStored(
        block_hashes=list(range(first_hash, first_hash + n_blocks)),
        parent_block_hash=fields.pop("parent_block_hash", None),  # type: ignore[arg-type]
        token_ids=list(range(n_blocks * BLOCK_SIZE)),
        block_size=BLOCK_SIZE,
        medium="GPU",
        **fields,  # type: ignore[arg-type]
    )


async def test_every_drop_reason_and_reset_cause_appears_on_the_gateways_metrics(
    ctx: zmq.asyncio.Context, tmp_path: Path
) -> None:
    feed = await start_feed(ctx, "engine-a")  # our publisher, with a replay ROUTER
    raw = ctx.socket(zmq.PUB)  # an engine without replay, driven frame by frame
    raw.setsockopt(zmq.LINGER, 0)
    raw.bind("tcp://127.0.0.1:*")
    raw_endpoint = raw.getsockopt_string(zmq.LAST_ENDPOINT)
    entries: list[dict[str, object]] = [
        {
            "name": "engine-a",
            "model": MODEL,
            "url": "http://127.0.0.1:9",
            "events": feed.pub.endpoint,
            "replay": feed.pub.replay_endpoint,
            "topic": "kv",
        },
        {"name": "raw", "model": MODEL, "url": "http://127.0.0.1:9", "events": raw_endpoint},
    ]
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump({"engines": entries}))
    settings = load_settings(
        fleet_file=fleet_file,
        port=0,
        log_level="warning",
        watch_interval_s=0.1,
        health_interval_s=60.0,
        max_blocks_per_source=MAX_BLOCKS_PER_SOURCE,
        retry_backoff_min_s=0.3,
        retry_backoff_max_s=0.3,
        replay_timeout_s=1.0,
        # Far above what this test sends until the flood at its end.
        source_events_per_s=2_000,
        ingest_burst_s=1.0,
        max_batch_blocks=MAX_BATCH_BLOCKS,
    )
    app = create_app(settings, metrics=Metrics())
    a, r = source_id("engine-a", 0), source_id("raw", 0)
    stream = EngineStream(7)
    try:
        async with (
            BackgroundServer(app) as server,
            httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=30) as http,
        ):
            gateway: Gateway = app.state.gateway
            subscribers = gateway.subscribers
            assert subscribers is not None and gateway.index is not None
            metrics_text = ""

            async def scrape() -> None:
                nonlocal metrics_text
                metrics_text = (await http.get("/metrics")).text

            def dropped(reason: DropReason) -> float:
                return _labels(metrics_text, "kvroute_events_dropped", "reason").get(reason, 0.0)

            def resets(cause: ResetCause) -> float:
                return _labels(metrics_text, "kvroute_source_resets", "cause").get(cause, 0.0)

            async def until_counted(check: Callable[[], bool], what: str) -> None:
                async def scraped() -> bool:
                    await scrape()
                    return check()

                await eventually(scraped, what, timeout_s=DEADLINE_S)

            # engine-a: the live stream flows (slow joiner) before faults are injected.
            await eventually(
                lambda: any(s.connected for s in subscribers.status()),
                "connected",
                timeout_s=DEADLINE_S,
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE_S
            while not await applied(subscribers, a, feed.publish(), timeout_s=0.3):
                assert loop.time() < deadline, "engine-a: no live batch ever arrived"

            # Index rules: each event below is dropped for its own reason.
            seq = feed.publish_batch(
                VllmEventBatch(
                    ts=0.0,
                    data_parallel_rank=0,
                    events=[
                        _stored(1, 9_000_001, parent_block_hash=123_456_789),  # orphan
                        VllmBlockStored(  # misaligned: 15 tokens for one 16-token block
                            block_hashes=[9_000_010],
                            parent_block_hash=None,
                            token_ids=list(range(BLOCK_SIZE - 1)),
                            block_size=BLOCK_SIZE,
                        ),
                        _stored(1, 9_000_020, extra_keys=[[("mm-hash", 0)]]),  # multimodal
                        _stored(1, 9_000_030, group_idx=1),  # a sliding-window group
                        VllmBlockRemoved(block_hashes=[9_999_999], medium="GPU"),  # never stored
                        _stored(MAX_BLOCKS_PER_SOURCE + 8, 9_100_000),  # over the cap
                    ],
                )
            )
            assert await applied(subscribers, a, seq)
            # An event kind no release sends: skipped by the decoder, counted by the subscriber.
            unknown = msgspec.msgpack.encode([0.0, [["FutureEvent", [1], 2]], 0])
            assert await applied(subscribers, a, feed.pub.publish_payload(unknown))
            # A batch lost on the wire: replay closes the gap and repeats the revealing batch.
            feed.pub.drop_next(1)
            feed.publish(1)
            assert await applied(subscribers, a, feed.publish(2))
            # The engine cleared its cache; then a payload no release can decode.
            feed.publish_batch(VllmEventBatch(ts=0.0, events=[VllmAllBlocksCleared()]))
            assert await applied(subscribers, a, feed.pub.publish_payload(b"\xc1garbage"))
            # A batch with more block hashes than a source may send in one.
            too_large = VllmBlockRemoved(
                block_hashes=list(range(1, MAX_BATCH_BLOCKS + 2)), medium="GPU"
            )
            assert await applied(
                subscribers, a, feed.publish_batch(VllmEventBatch(ts=0.0, events=[too_large]))
            )
            # index.apply for a source the index does not know (removed meanwhile).
            gateway.index.apply(source_id("ghost", 0), normalise_batch(stream.batch(2)))

            # raw: a gap it cannot replay makes it stale (its batches are dropped), then it
            # resyncs; seq going backwards is a restart; closing the socket a disconnect.
            async def send(n: int) -> None:
                await raw.send_multipart(
                    [b"", n.to_bytes(8, "big"), encode_batch(stream.batch(), "0.33.0")]
                )

            n = 0
            deadline = loop.time() + DEADLINE_S
            while True:
                await send(n)
                if await applied(subscribers, r, n, timeout_s=0.2):
                    break
                assert loop.time() < deadline, "raw: no live batch ever arrived"
                n += 1
            base = n
            n += 1  # the next send skips one seq: the gap

            async def resynced() -> bool:
                # Keep publishing: stale batches are dropped until the retry resyncs.
                nonlocal n
                n += 1
                await send(n)
                await scrape()
                if not (dropped(DropReason.STALE_SOURCE) and resets(ResetCause.RESYNC)):
                    return False
                status = next(s for s in subscribers.status() if s.source == r)
                return not status.stale and status.last_seq == n

            await eventually(
                resynced, "raw: stale, then resynced", timeout_s=DEADLINE_S, interval_s=0.05
            )
            await send(base)
            await until_counted(lambda: bool(resets(ResetCause.SEQ_BACKWARDS)), "seq_backwards")
            raw.close(linger=0)
            await until_counted(lambda: bool(resets(ResetCause.DISCONNECT)), "disconnect")

            # The raw engine leaves the fleet file.
            fleet_file.write_text(yaml.safe_dump({"engines": entries[:1]}))
            await until_counted(lambda: bool(resets(ResetCause.REMOVED)), "removed")

            # engine-a floods: 6,000 events at once, three times its saved-up budget.
            feed.publish(600, events=10)
            await until_counted(lambda: bool(dropped(DropReason.OVER_BUDGET)), "over_budget")

            await scrape()
            missing_reasons = [reason for reason in DropReason if not dropped(reason)]
            # `unconfirmed` needs a snapshot and a second gateway: test_warm_restart.py has it.
            missing_causes = [
                cause
                for cause in ResetCause
                if not resets(cause) and cause is not ResetCause.UNCONFIRMED
            ]
            assert missing_reasons == [], metrics_text
            assert missing_causes == [], metrics_text
    finally:
        raw.close(linger=0)
        await feed.pub.close()
