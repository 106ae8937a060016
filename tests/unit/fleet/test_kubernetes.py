"""Kubernetes discovery with the real client library (kubernetes_asyncio) against a stand-in API
server speaking list/watch over HTTP: list, add, remove, readiness, IP change, 410, cuts, RBAC."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kvroute.errors import ConfigError
from kvroute.fleet import EngineSpec
from kvroute.fleet.kubernetes import (
    KubernetesFleetSource,
    KubernetesTarget,
    engine_from_pod,
    kubernetes_api_client,
    pod_ready,
)
from kvroute.gateway.server import BackgroundServer
from tests.k8s_apiserver import FakeApiServer, kubeconfig, pod
from tests.polling import eventually

SELECTOR = "kvroute.io/engine=vllm"


class Discovery:
    """The source under test, watching the stand-in; `next()` is its next engine list."""

    def __init__(self, source: KubernetesFleetSource, api: FakeApiServer) -> None:
        self.source = source
        self.api = api
        self._stream = source.watch()

    async def next(self, timeout_s: float = 10.0) -> list[EngineSpec]:
        return await asyncio.wait_for(anext(self._stream), timeout_s)

    async def until(self, names: set[str], timeout_s: float = 10.0) -> list[EngineSpec]:
        """The first engine list with exactly these engine names."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            specs = await self.next(max(0.1, deadline - loop.time()))
            if {s.name for s in specs} == names:
                return specs

    async def close(self) -> None:
        await self._stream.aclose()


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    yield FakeApiServer()


@pytest.fixture
async def discovery(
    api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with BackgroundServer(api.app()) as server:
        config = tmp_path / "kubeconfig"
        config.write_text(kubeconfig(server.url))
        opened: list[Discovery] = []

        def start(target: KubernetesTarget | None = None) -> Discovery:
            source = KubernetesFleetSource(
                target or KubernetesTarget("ns", SELECTOR),
                lambda: kubernetes_api_client(config),
                watch_timeout_s=30,
                backoff_s=(0.01, 0.05),
                request_timeout_s=5,
                rng=random.Random(0),
            )
            opened.append(Discovery(source, api))
            return opened[-1]

        yield start
        for d in opened:
            await d.close()


async def test_initial_list_gives_the_ready_pods_with_their_annotated_fields(
    api: FakeApiServer, discovery: Any
) -> None:
    api.put(pod("a", "10.0.0.1"))
    api.put(
        pod(
            "b",
            "10.0.0.2",
            annotations={
                "kvroute.io/model": "meta-llama/Llama-3.1-8B",
                "kvroute.io/port": "9000",
                "kvroute.io/events-port": "6000",
                "kvroute.io/replay-port": "6100",
                "kvroute.io/topic": "kv",
                "kvroute.io/dp-ranks": "0,1",
                "kvroute.io/lora": "sql, chat",
            },
        )
    )
    api.put(pod("c", "10.0.0.3", ready=False))
    api.put(pod("other", "10.0.0.4", labels={"app": "web"}))
    d = discovery()
    specs = await d.next()
    assert [s.name for s in specs] == ["a", "b"]
    a, b = specs
    assert (a.model, a.url, a.events, a.replay, a.topic, a.dp_ranks, a.lora) == (
        "m", "http://10.0.0.1:8000", "tcp://10.0.0.1:5557", None, "", (0,), (),
    )  # fmt: skip
    assert (b.model, b.url, b.events, b.replay, b.topic, b.dp_ranks, b.lora) == (
        "meta-llama/Llama-3.1-8B", "http://10.0.0.2:9000", "tcp://10.0.0.2:6000",
        "tcp://10.0.0.2:6100", "kv", (0, 1), ("sql", "chat"),
    )  # fmt: skip
    assert api.lists[0]["labelSelector"] == SELECTOR
    listed = api.version
    api.put(pod("d", "10.0.0.5"))  # arrives through the watch that follows the list
    await d.until({"a", "b", "d"})
    assert api.watches[0]["allowWatchBookmarks"] in ("True", "true", "1")
    assert api.watches[0]["resourceVersion"] == str(listed)
    assert api.watches[0]["labelSelector"] == SELECTOR


async def test_pods_added_removed_readied_and_moved_change_the_fleet(
    api: FakeApiServer, discovery: Any
) -> None:
    api.put(pod("a", "10.0.0.1"))
    d = discovery()
    assert [s.name for s in await d.next()] == ["a"]
    api.put(pod("b", "10.0.0.2"))
    assert {s.name for s in await d.until({"a", "b"})} == {"a", "b"}
    api.delete("a")
    await d.until({"b"})
    api.put(pod("c", "10.0.0.3", ready=False))
    api.put(pod("c", "10.0.0.3", ready=True))  # not Ready -> Ready
    await d.until({"b", "c"})
    api.put(pod("b", "10.0.0.9"))  # rescheduled: same name, new IP
    specs = await d.next()
    assert {s.name: s.url for s in specs}["b"] == "http://10.0.0.9:8000"
    api.put(pod("c", "10.0.0.3", labels={"app": "web"}))  # relabelled out of the selector
    await d.until({"b"})
    assert d.source.errors == {}


@pytest.mark.parametrize("as_http", [False, True], ids=["error_event", "http_status"])
async def test_an_expired_resource_version_relists(
    api: FakeApiServer, discovery: Any, as_http: bool
) -> None:
    api.gone_as_http = as_http
    api.put(pod("a", "10.0.0.1"))
    d = discovery()
    await d.next()
    api.put(pod("b", "10.0.0.2"))
    await d.until({"a", "b"})
    api.expire()  # the server compacts its history ...
    api.delete("a")
    api.put(pod("c", "10.0.0.3"))
    api.expire()
    api.end_watches()  # ... and the re-watch from the old version gets 410 Gone
    await d.until({"b", "c"})
    assert d.source.errors["gone"] == 1
    assert len(api.lists) == 2


async def test_a_bookmark_moves_the_resume_version(api: FakeApiServer, discovery: Any) -> None:
    api.put(pod("a", "10.0.0.1"))
    d = discovery()
    await d.next()
    pending = asyncio.ensure_future(d.next())  # the source reads its watch meanwhile
    api.version += 50  # changes elsewhere in the cluster
    api.bookmark()
    await eventually(lambda: api.bookmarks_sent == 1, "the bookmark went out")
    api.end_watches()
    await eventually(lambda: len(api.watches) == 2, "a second watch")
    assert int(api.watches[1]["resourceVersion"]) == int(api.watches[0]["resourceVersion"]) + 50
    api.put(pod("b", "10.0.0.2"))
    assert {s.name for s in await pending} == {"a", "b"}
    assert len(api.lists) == 1  # resumed from the bookmark, not relisted


async def test_a_watch_cut_mid_event_relists_and_loses_nothing(
    api: FakeApiServer, discovery: Any
) -> None:
    api.put(pod("a", "10.0.0.1"))
    d = discovery()
    await d.next()
    pending = asyncio.ensure_future(d.until({"a", "b"}))
    await eventually(lambda: len(api.watches) == 1, "the watch open")
    api.cut_watches()
    await eventually(lambda: d.source.errors["connection"] >= 1, "the cut noticed")
    api.put(pod("b", "10.0.0.2"))
    await pending
    assert len(api.lists) >= 2  # relisted after the cut


async def test_malformed_annotations_leave_that_pod_out_with_one_error(
    api: FakeApiServer, discovery: Any
) -> None:
    api.put(pod("good", "10.0.0.1"))
    api.put(pod("bad", "10.0.0.2", annotations={"kvroute.io/model": "m", "kvroute.io/port": "x"}))
    api.put(pod("nomodel", "10.0.0.3", annotations={}))
    d = discovery()
    assert [s.name for s in await d.next()] == ["good"]
    assert d.source.errors["pod"] == 2
    api.put(pod("good2", "10.0.0.4"))
    await d.until({"good", "good2"})
    assert d.source.errors["pod"] == 2  # reported once per change of the pod, not per event


async def test_rbac_forbidden_is_reported_and_retried_until_granted(
    api: FakeApiServer, discovery: Any, caplog: pytest.LogCaptureFixture
) -> None:
    api.forbidden = True
    api.put(pod("a", "10.0.0.1"))
    d = discovery()
    pending = asyncio.ensure_future(d.next())
    await eventually(lambda: d.source.errors["forbidden"] >= 2, "retried while forbidden")
    assert not pending.done()
    assert "cannot list resource" in caplog.text and "service account needs" in caplog.text
    api.forbidden = False
    assert [s.name for s in await pending] == ["a"]


async def test_an_inference_pool_picks_the_selector_and_the_port(
    api: FakeApiServer, discovery: Any
) -> None:
    api.pools["pool"] = {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "pool"},
        "spec": {
            "selector": {"matchLabels": {"app": "vllm-llama"}},
            "targetPorts": [{"number": 8200}],
        },
    }
    api.put(pod("a", "10.0.0.1", labels={"app": "vllm-llama"}))
    api.put(pod("b", "10.0.0.2"))  # the default selector's label, not the pool's
    d = discovery(KubernetesTarget("ns", inference_pool="pool"))
    specs = await d.next()
    assert [(s.name, s.url) for s in specs] == [("a", "http://10.0.0.1:8200")]
    assert api.lists[0]["labelSelector"] == "app=vllm-llama"
    # The pool is re-read whenever a watch ends; a new selector relists.
    pending = asyncio.ensure_future(d.until({"b"}))
    await eventually(lambda: len(api.watches) == 1, "the watch open")
    api.pools["pool"]["spec"]["selector"]["matchLabels"] = {"kvroute.io/engine": "vllm"}
    api.end_watches()
    assert [s.url for s in await pending] == ["http://10.0.0.2:8200"]
    assert api.lists[-1]["labelSelector"] == "kvroute.io/engine=vllm"


def test_readiness_needs_running_ready_an_ip_and_no_deletion() -> None:
    assert pod_ready(pod("a"))
    assert not pod_ready(pod("a", ready=False))
    no_ip = pod("a")
    no_ip["status"]["podIP"] = ""
    deleting = pod("a")
    deleting["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    pending = pod("a")
    pending["status"]["phase"] = "Pending"
    assert not any(pod_ready(p) for p in (no_ip, deleting, pending))


@pytest.mark.parametrize(
    ("annotations", "field"),
    [
        ({}, "kvroute.io/model"),
        ({"kvroute.io/model": "m", "kvroute.io/events-port": "99999"}, "events"),
        ({"kvroute.io/model": "m", "kvroute.io/dp-ranks": "0,x"}, "kvroute.io/dp-ranks"),
        ({"kvroute.io/model": "m", "kvroute.io/replay-port": "5557"}, "replay"),
    ],
)
def test_a_malformed_pod_is_a_config_error_naming_pod_and_field(
    annotations: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^pod ns/p: .*{field}"):
        engine_from_pod({**pod("p", annotations=annotations), "metadata": {
            "name": "p", "namespace": "ns", "annotations": annotations}})  # fmt: skip


def test_ipv6_pods_get_bracketed_addresses_and_events_can_be_off() -> None:
    spec = engine_from_pod(
        pod("p", "fd00::7", annotations={"kvroute.io/model": "m", "kvroute.io/events-port": "none"})
    )
    assert (spec.url, spec.events) == ("http://[fd00::7]:8000", None)


async def test_in_a_pod_the_service_account_and_the_service_address_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a pod sees (the in-cluster rule of the client); the API server itself is not here.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    (tmp_path / "token").write_text("pod-token")
    (tmp_path / "ca.crt").write_text(_TEST_CA)
    api = await kubernetes_api_client(None, service_account=tmp_path)
    try:
        config = api.configuration
        assert config.host == "https://10.96.0.1:443"
        assert config.api_key["BearerToken"].endswith("pod-token")
        assert config.ssl_ca_cert == str(tmp_path / "ca.crt")
    finally:
        await api.close()


async def test_missing_credentials_are_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(ConfigError, match="kubernetes: cannot load credentials"):
        await kubernetes_api_client(None, service_account=tmp_path)  # no token there


# A throwaway self-signed certificate (openssl, EC P-256, CN kvroute-test-ca): the client loads
# the pod's CA file when it is built, so it must be a certificate; nothing is signed with it.
_TEST_CA = """\
-----BEGIN CERTIFICATE-----
MIIBizCCATGgAwIBAgIUXrQcBOOyl2OLxRDjf+f/ikKAILUwCgYIKoZIzj0EAwIw
GjEYMBYGA1UEAwwPa3Zyb3V0ZS10ZXN0LWNhMCAXDTI2MTIwMTE3MTIzNVoYDzIx
MjYxMTA3MTcxMjM1WjAaMRgwFgYDVQQDDA9rdnJvdXRlLXRlc3QtY2EwWTATBgcq
hkjOPQIBBggqhkjOPQMBBwNCAARu/Mp+Wv38gIC4CB7KcQdQyAD81Qs/FHGAJCKA
C11w9Yj3m4zKUUSeH2Jhe46S1wIKHkqPtgMZ+19Uqm61rqfRo1MwUTAdBgNVHQ4E
FgQUQJzDzM0QFmG3TJh/1WMM5B4aOIkwHwYDVR0jBBgwFoAUQJzDzM0QFmG3TJh/
1WMM5B4aOIkwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBFAiEAqWp9
cz9a/ux4xKE9Fb6pynn2Ao9uksyundxjm5TektcCIHA068edLlxuhEZykzdYKPRF
ilP0ZvQ9RBJgrcuX1hak
-----END CERTIFICATE-----
"""
