"""Engines from Kubernetes: list+watch the Ready pods a label selector (or an InferencePool)
picks in one namespace; each pod's engine fields come from documented annotations."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio import watch as k8s_watch
from kubernetes_asyncio.client.exceptions import ApiException

from kvroute.errors import ConfigError
from kvroute.fleet.spec import EngineSpec, parse_fleet

__all__ = [
    "ANNOTATION_PREFIX",
    "KubernetesFleetSource",
    "KubernetesTarget",
    "engine_from_pod",
    "kubernetes_api_client",
    "pod_ready",
]

log = logging.getLogger(__name__)

ANNOTATION_PREFIX: Final = "kvroute.io/"
# Defaults are vLLM's own (its KVEventsConfig binds events on 5557, no replay, topic ""; the
# OpenAI server listens on 8000), so a pod needs only `kvroute.io/model` unless it deviates.
_DEFAULT_HTTP_PORT: Final = 8000
_DEFAULT_EVENTS_PORT: Final = 5557
_OFF: Final = frozenset({"", "none", "off", "false"})
_POOL_GROUP: Final = "inference.networking.k8s.io"
_POOL_VERSION: Final = "v1"
_LIST_PAGE: Final = 500


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Whether a pod may take traffic: running, not being deleted, condition Ready is "True",
    and it has an IP (the Gateway API Inference Extension's rule; docs/notes/issue-11-research.md
    §C)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    if not status.get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or ()
        if isinstance(c, Mapping)
    )


def _annotation(meta: Mapping[str, Any], key: str) -> str | None:
    value = (meta.get("annotations") or {}).get(ANNOTATION_PREFIX + key)
    return value if isinstance(value, str) else None


def _port(meta: Mapping[str, Any], key: str, default: int | None) -> int | None:
    raw = _annotation(meta, key)
    if raw is None:
        return default
    if raw.strip().lower() in _OFF:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"annotation {ANNOTATION_PREFIX}{key}: expected a port number or 'none', got {raw!r}"
        ) from None


def _list(meta: Mapping[str, Any], key: str) -> list[str]:
    raw = _annotation(meta, key)
    return [item.strip() for item in raw.split(",") if item.strip()] if raw else []


def engine_from_pod(pod: Mapping[str, Any], *, default_port: int | None = None) -> EngineSpec:
    """The engine a Ready pod serves, from its annotations (README "Run on Kubernetes"); a
    missing model or a malformed annotation raises ConfigError naming the pod and the field."""
    meta = pod.get("metadata") or {}
    where = f"pod {meta.get('namespace', '?')}/{meta.get('name', '?')}"
    try:
        model = _annotation(meta, "model")
        if not model:
            raise ConfigError(f"annotation {ANNOTATION_PREFIX}model: required, but missing")
        ip = str((pod.get("status") or {}).get("podIP"))
        host = f"[{ip}]" if ":" in ip else ip
        http_port = _port(meta, "port", default_port or _DEFAULT_HTTP_PORT)
        events_port = _port(meta, "events-port", _DEFAULT_EVENTS_PORT)
        replay_port = _port(meta, "replay-port", None)
        ranks_text = _list(meta, "dp-ranks") or ["0"]
        try:
            ranks = [int(r) for r in ranks_text]
        except ValueError:
            raise ConfigError(
                f"annotation {ANNOTATION_PREFIX}dp-ranks: expected ints like '0,1', "
                f"got {_annotation(meta, 'dp-ranks')!r}"
            ) from None
        entry: dict[str, Any] = {
            "name": meta.get("name"),
            "model": model,
            "url": f"http://{host}:{http_port}",
            "events": None if events_port is None else f"tcp://{host}:{events_port}",
            "replay": None if replay_port is None else f"tcp://{host}:{replay_port}",
            "topic": _annotation(meta, "topic") or "",
            "dp_ranks": ranks,
            "lora": _list(meta, "lora"),
            # The relay's (or publisher's) CURVE public key: subscribe encrypted.
            "curve_server_key": _annotation(meta, "curve-server-key") or None,
        }
        # The fleet file's validation, field by field, so both sources accept the same engines.
        (spec,) = parse_fleet({"engines": [entry]}, origin=where)
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from exc
    return spec


@dataclass(frozen=True)
class KubernetesTarget:
    """Which pods form the fleet: a namespace and a label selector, or an InferencePool whose
    selector and first target port decide (its port is the pods' HTTP port)."""

    namespace: str
    label_selector: str = ""
    inference_pool: str | None = None


_SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")


async def kubernetes_api_client(
    kubeconfig: Path | None, *, service_account: Path = _SERVICE_ACCOUNT
) -> k8s.ApiClient:
    """A client of the cluster's API server: in-cluster credentials (the pod's service account
    token and CA under `service_account`) when running in a pod and no kubeconfig is named, else
    the kubeconfig (`kubeconfig`, `$KUBECONFIG` or ~/.kube/config)."""
    configuration = k8s.Configuration()
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration,
                token_filename=str(service_account / "token"),
                cert_filename=str(service_account / "ca.crt"),
            )
        else:
            await k8s_config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig is not None else None,
                client_configuration=configuration,
            )
    except (k8s_config.ConfigException, OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"kubernetes: cannot load credentials: {exc}") from exc
    return k8s.ApiClient(configuration)


class KubernetesFleetSource:
    """A `FleetSource` (fleet/source.py) over the Kubernetes API: list the pods, then watch from
    the list's resourceVersion with bookmarks; yields the engines of the Ready pods each time
    they change. A 410 Gone (an expired resourceVersion, as an HTTP status or an ERROR event)
    relists at once; any other failure (API down, RBAC forbidden, a stream cut mid-event)
    re-watches or relists after a jittered exponential backoff. A pod whose annotations are
    malformed is left out with one warning per change of it, the rest of the fleet unaffected.

    `errors` counts by reason: `gone` (410, relisted), `forbidden` (403), `api` (other API
    errors), `connection` (transport failures and cut streams), `pod` (malformed pods).
    """

    def __init__(
        self,
        target: KubernetesTarget,
        api_client: Callable[[], Any],
        *,
        watch_timeout_s: float,
        backoff_s: tuple[float, float],
        request_timeout_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self._target = target
        self._api_client = api_client
        self._watch_timeout_s = watch_timeout_s
        self._backoff_s = backoff_s
        self._request_timeout_s = request_timeout_s
        self._rng = rng if rng is not None else random.Random()
        self.errors: collections.Counter[str] = collections.Counter()
        self._pods: dict[str, Mapping[str, Any]] = {}
        # pod name -> ((resourceVersion, HTTP port), its engine or None when malformed): a pod
        # is parsed, and a malformed one reported, once per change of it, not once per event.
        self._engines: dict[str, tuple[tuple[str, int | None], EngineSpec | None]] = {}
        self._last: list[EngineSpec] | None = None

    async def watch(self) -> AsyncIterator[list[EngineSpec]]:
        api = await self._api_client()
        try:
            failures = 0
            while True:
                try:
                    async for specs in self._list_and_watch(api):
                        failures = 0
                        yield specs
                    continue  # the InferencePool changed: relist with its new selector
                except ApiException as exc:
                    if exc.status == 410:
                        self.errors["gone"] += 1
                        log.info("kubernetes: resourceVersion expired (410); relisting")
                        continue
                    reason = "forbidden" if exc.status == 403 else "api"
                    self.errors[reason] += 1
                    hint = (
                        " (the service account needs list and watch on pods, and get on "
                        'inferencepools with an InferencePool; README "Run on Kubernetes")'
                        if exc.status == 403
                        else ""
                    )
                    log.error("kubernetes: %s %s%s", exc.status, exc.reason, hint)
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                    self.errors["connection"] += 1
                    log.warning("kubernetes: connection failed: %s: %s", type(exc).__name__, exc)
                failures += 1
                await asyncio.sleep(self._delay(failures))
        finally:
            await api.close()

    def _delay(self, failures: int) -> float:
        low, high = self._backoff_s
        delay: float = min(high, low * 2 ** (failures - 1)) * self._rng.uniform(0.5, 1.0)
        return delay

    async def _list_and_watch(self, api: Any) -> AsyncIterator[list[EngineSpec]]:
        """One list, then watches from its resourceVersion until something fails (raises)."""
        selector, port = await self._selector(api)
        core = k8s.CoreV1Api(api)
        pods, version = await self._list(core, selector)
        self._pods = pods
        self._last = None
        yield self._changed(port, force=True) or []
        while True:
            async with k8s_watch.Watch(return_type="object") as stream:
                async for event in stream.stream(
                    core.list_namespaced_pod,
                    self._target.namespace,
                    label_selector=selector,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=max(1, int(self._watch_timeout_s)),
                    _request_timeout=self._watch_timeout_s + self._request_timeout_s,
                ):
                    if not isinstance(event, dict):  # a line cut mid-event: re-watch from rv
                        raise ValueError(f"watch stream broke mid-event: {str(event)[:80]!r}")
                    kind = event.get("type")
                    obj = event.get("raw_object") or {}
                    name = (obj.get("metadata") or {}).get("name")
                    if kind in ("ADDED", "MODIFIED") and name:
                        self._pods[name] = obj
                    elif kind == "DELETED" and name:
                        self._pods.pop(name, None)
                    else:
                        continue  # BOOKMARK: the stream's resourceVersion moved on
                    specs = self._changed(port)
                    if specs is not None:
                        yield specs
                # The server ended the watch (timeoutSeconds): resume from the last version
                # this stream saw, bookmarks included; a changed InferencePool relists.
                version = stream.resource_version or version
            if self._target.inference_pool is not None and await self._selector(api) != (
                selector,
                port,
            ):
                return

    async def _selector(self, api: Any) -> tuple[str, int | None]:
        """The label selector (and HTTP port) in force: the target's, or its InferencePool's."""
        pool_name = self._target.inference_pool
        if pool_name is None:
            return self._target.label_selector, None
        pool = await k8s.CustomObjectsApi(api).get_namespaced_custom_object(
            _POOL_GROUP,
            _POOL_VERSION,
            self._target.namespace,
            "inferencepools",
            pool_name,
            _request_timeout=self._request_timeout_s,
        )
        spec = pool.get("spec") or {}
        labels = (spec.get("selector") or {}).get("matchLabels") or {}
        ports = spec.get("targetPorts") or []
        port = ports[0].get("number") if ports and isinstance(ports[0], dict) else None
        if not labels:
            raise ConfigError(f"InferencePool {pool_name}: spec.selector.matchLabels is empty")
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items())), port

    async def _list(
        self, core: Any, selector: str
    ) -> tuple[dict[str, Mapping[str, Any]], str | None]:
        """Every matching pod, page by page, and the list's resourceVersion."""
        pods: dict[str, Mapping[str, Any]] = {}
        token: str | None = None
        version: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": selector, "limit": _LIST_PAGE}
            if token:
                kwargs["_continue"] = token
            page = await core.list_namespaced_pod(
                self._target.namespace,
                _preload_content=False,
                _request_timeout=self._request_timeout_s,
                **kwargs,
            )
            async with page:
                body = await page.json()
                if page.status != 200:  # a Status object says why
                    why = f"{body.get('reason')}: {body.get('message')}" if body else ""
                    raise ApiException(status=page.status, reason=why)
            for pod in body.get("items") or ():
                name = (pod.get("metadata") or {}).get("name")
                if name:
                    pods[name] = pod
            metadata = body.get("metadata") or {}
            version = metadata.get("resourceVersion") or version
            token = metadata.get("continue") or None
            if token is None:
                return pods, version

    def _changed(self, port: int | None, *, force: bool = False) -> list[EngineSpec] | None:
        """The engines of the Ready pods, or None when they are what was yielded last."""
        specs: list[EngineSpec] = []
        for name, pod in sorted(self._pods.items()):
            if pod_ready(pod):
                spec = self._engine(name, pod, port)
                if spec is not None:
                    specs.append(spec)
        for gone in self._engines.keys() - self._pods.keys():
            del self._engines[gone]
        if not force and specs == self._last:
            return None
        self._last = specs
        return specs

    def _engine(self, name: str, pod: Mapping[str, Any], port: int | None) -> EngineSpec | None:
        """The pod's engine, parsed once per (resourceVersion, port); None when malformed."""
        key = (str((pod.get("metadata") or {}).get("resourceVersion")), port)
        cached = self._engines.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        spec: EngineSpec | None = None
        try:
            spec = engine_from_pod(pod, default_port=port)
        except ConfigError as exc:
            self.errors["pod"] += 1
            log.warning("kubernetes: pod left out of the fleet: %s", exc)
        self._engines[name] = (key, spec)
        return spec
