"""deploy/kubernetes, checked offline: every manifest against the Kubernetes OpenAPI schemas
(kubernetes-validate bundles them) and the ServiceMonitor against the Prometheus Operator's CRD
(its generated models, cloudcoil-models-prometheus-operator); then against kvroute itself: the
probes and the scrape path are routes the gateway serves (and answer as the probes expect on a
gateway configured like the pod), every KVROUTE_* variable is a setting and parses, the Role
grants exactly what discovery asks the API server for (recorded against the stand-in API
server), ports, labels, selectors and references agree.

The base is loaded by tests/deploy/manifests.py; where `kubectl` (or `kustomize`) is installed,
kustomize's own rendering is checked to equal it, and the overlays are rendered and checked too
(without one those tests skip, saying so)."""

from __future__ import annotations

import asyncio
import random
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import kubernetes_validate
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from kvroute.errors import ConfigError
from kvroute.fleet.kubernetes import KubernetesFleetSource, KubernetesTarget, kubernetes_api_client
from kvroute.gateway import BackgroundServer, create_app
from kvroute.metrics import Metrics
from kvroute.settings import Settings, load_settings, settings_env_names
from kvroute.sim import SimConfig, SimFleet
from tests.deploy.manifests import (
    BASE,
    OVERLAYS,
    ROOT,
    Doc,
    by_kind,
    containers,
    kustomization,
    kustomize_command,
    load_base,
    load_yaml_docs,
    one,
    pod_spec,
    render,
)
from tests.k8s_apiserver import FakeApiServer, kubeconfig, pod
from tests.polling import eventually

# The oldest Kubernetes minor still commonly run, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
SETTINGS_ENV = frozenset(n for f in Settings.model_fields for n in settings_env_names(f))
NEEDS_KUSTOMIZE = pytest.mark.skipif(
    kustomize_command() is None,
    reason="neither kubectl nor kustomize is installed: the overlays and kustomize's own "
    "rendering of the base are not checked (the base is, by tests/deploy/manifests.py)",
)


def _overlay_id(path: Path) -> str:
    return path.name


@pytest.fixture(scope="module")
def base() -> list[Doc]:
    return load_base()


# --- schemas ------------------------------------------------------------------------------------


def _validate_schemas(docs: list[Doc]) -> None:
    for doc in (d for d in docs if d["kind"] != "ServiceMonitor"):
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                raise AssertionError(
                    f"{doc['kind']}/{doc['metadata']['name']} against Kubernetes {version}: "
                    f"{where}: {exc.message}"
                ) from None
    for doc in by_kind(docs, "ServiceMonitor"):
        _validate_service_monitor(doc)


def _validate_service_monitor(doc: Doc) -> None:
    """The Prometheus Operator's ServiceMonitor CRD (monitoring.coreos.com/v1) as pydantic
    models: types, enums and patterns are checked on validation; a field the CRD does not know
    is dropped by the models, so a round trip that loses anything names an unknown field."""
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    model = ServiceMonitor.model_validate(doc)
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


def test_base_matches_the_kubernetes_and_servicemonitor_schemas(base: list[Doc]) -> None:
    assert sorted(d["kind"] for d in base) == [
        "ConfigMap", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount",
        "ServiceMonitor",
    ]  # fmt: skip
    _validate_schemas(base)


def test_schema_checks_catch_mistakes(base: list[Doc]) -> None:
    deployment = one(base, "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}  # a typo'd field
    with pytest.raises(AssertionError, match="replica"):
        _validate_schemas([broken])
    monitor = one(base, "ServiceMonitor")
    endpoint = {**monitor["spec"]["endpoints"][0], "intervall": "30s"}
    typo = {**monitor, "spec": {**monitor["spec"], "endpoints": [endpoint]}}
    with pytest.raises(AssertionError):
        _validate_service_monitor(typo)
    bad_interval = {**monitor["spec"]["endpoints"][0], "interval": "half a minute"}
    with pytest.raises(ValueError, match="interval"):
        _validate_service_monitor(
            {**monitor, "spec": {**monitor["spec"], "endpoints": [bad_interval]}}
        )


# --- kvroute's settings -------------------------------------------------------------------------


def container_env(docs: list[Doc]) -> dict[str, Any]:
    """The kvroute container's environment: the ConfigMaps it loads, then its own `env` (a
    valueFrom entry maps to its source, e.g. {"fieldRef": ...})."""
    (container,) = containers(one(docs, "Deployment"))
    maps = {m["metadata"]["name"]: m.get("data") or {} for m in by_kind(docs, "ConfigMap")}
    env: dict[str, Any] = {}
    for source in container.get("envFrom") or ():
        ref = source["configMapRef"]["name"]
        assert ref in maps, f"envFrom names ConfigMap {ref}, which is not deployed"
        env.update(maps[ref])
    for entry in container.get("env") or ():
        assert entry["name"] not in env, f"{entry['name']} set twice (ConfigMap and env)"
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


def _check_settings(docs: list[Doc]) -> dict[str, Any]:
    env = container_env(docs)
    names = {n for n in env if n.upper().startswith("KVROUTE_")}
    assert names, "the container sets no KVROUTE_* setting"
    unknown = sorted(names - SETTINGS_ENV)
    assert not unknown, f"not kvroute settings (kvroute.settings.Settings): {unknown}"
    # Discovery in the pod's own namespace, which is where its namespaced Role applies.
    assert env["KVROUTE_K8S_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "KVROUTE_FLEET_FILE" not in env
    return env


def test_every_variable_is_a_setting_and_parses(
    base: list[Doc], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _check_settings(base)
    for name, value in env.items():
        monkeypatch.setenv(name, value if isinstance(value, str) else "inference")
    settings = load_settings()
    assert settings.k8s_namespace == "inference"
    assert settings.k8s_label_selector == "kvroute.io/engine=vllm"
    assert settings.fleet_file is None


def test_an_unknown_variable_is_caught(base: list[Doc]) -> None:
    settings_map = one(base, "ConfigMap")
    typo = {**settings_map, "data": {**settings_map["data"], "KVROUTE_K8S_NAMESPCE": "x"}}
    docs = [typo if d is settings_map else d for d in base]
    with pytest.raises(AssertionError, match="KVROUTE_K8S_NAMESPCE"):
        _check_settings(docs)


def _memory_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def test_the_pod_can_hold_what_the_settings_ask_for(base: list[Doc]) -> None:
    env = container_env(base)
    deployment = one(base, "Deployment")
    (container,) = containers(deployment)
    limit = _memory_bytes(container["resources"]["limits"]["memory"])
    request = _memory_bytes(container["resources"]["requests"]["memory"])
    assert request <= limit
    # The index budget, the rest of the process and the snapshot writer's copy-on-write pages.
    assert int(env["KVROUTE_MAX_INDEX_BYTES"]) * 2 <= limit
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    # The root filesystem is read-only: every file kvroute writes is on a mounted volume.
    mounts = [Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")]
    snapshot = Path(env["KVROUTE_SNAPSHOT_PATH"])
    assert any(snapshot.is_relative_to(m) for m in mounts), f"{snapshot} is not on a volume"
    volumes = {v["name"] for v in pod_spec(deployment)["volumes"]}  # type: ignore[index]
    assert {m["name"] for m in container["volumeMounts"]} <= volumes


def test_pod_security(base: list[Doc]) -> None:
    deployment = one(base, "Deployment")
    spec = pod_spec(deployment)
    assert spec is not None
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # A Service named kvroute would put KVROUTE_PORT=tcp://... into the environment, which
    # kvroute reads as its `port` setting and refuses (docker-links style service variables).
    assert spec["enableServiceLinks"] is False
    for container in containers(deployment):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context.get("privileged", False) is False


def test_service_links_would_break_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Why enableServiceLinks is off: the variable the kubelet would add for Service "kvroute".
    monkeypatch.setenv("KVROUTE_PORT", "tcp://10.96.0.17:8080")
    with pytest.raises(ConfigError, match="port"):
        load_settings()


# --- the gateway's routes and probes ------------------------------------------------------------


def _probes(container: Doc) -> dict[str, Doc]:
    kinds = ("startupProbe", "livenessProbe", "readinessProbe")
    return {k: container[k]["httpGet"] for k in kinds if k in container}


def test_probe_and_scrape_paths_are_gateway_routes(base: list[Doc]) -> None:
    app = create_app(load_settings(), metrics=Metrics())
    get_routes = {r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ())}
    (container,) = containers(one(base, "Deployment"))
    probes = _probes(container)
    assert set(probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    scrape = [e["path"] for e in one(base, "ServiceMonitor")["spec"]["endpoints"]]
    for path in [p["path"] for p in probes.values()] + scrape:
        assert path in get_routes, f"{path} is not a GET route of the gateway"


def _ports(container: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports") or ()}


def test_ports_agree(base: list[Doc]) -> None:
    env = container_env(base)
    (container,) = containers(one(base, "Deployment"))
    ports = _ports(container)
    assert ports["http"] == int(env["KVROUTE_PORT"])
    for probe in _probes(container).values():
        assert probe["port"] in ports or probe["port"] in ports.values()
    service = one(base, "Service")
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert target in ports or target in ports.values(), f"targetPort {target}: no such port"
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in one(base, "ServiceMonitor")["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports


def test_labels_selectors_and_references_agree(base: list[Doc]) -> None:
    deployment = one(base, "Deployment")
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= template_labels.items()
    service = one(base, "Service")
    assert service["spec"]["selector"].items() <= template_labels.items()
    monitor = one(base, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    # Service accounts, roles and their bindings name each other, in one namespace.
    namespaces = {d["metadata"].get("namespace") for d in base}
    assert len(namespaces) == 1 and None not in namespaces
    account = one(base, "ServiceAccount")
    role, binding = one(base, "Role"), one(base, "RoleBinding")
    assert pod_spec(deployment)["serviceAccountName"] == account["metadata"]["name"]  # type: ignore[index]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]


async def test_probes_answer_on_a_gateway_configured_like_the_pod(
    base: list[Doc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Deployment's environment (its namespace and the snapshot path aside) on a gateway that
    discovers engines from the stand-in API server: alive and scrapable at once, Ready only once
    a vLLM pod is (a simulated engine behind it)."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    for name, value in container_env(base).items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    (container,) = containers(one(base, "Deployment"))
    probes = {k: v["path"] for k, v in _probes(container).items()}
    (scrape,) = [e["path"] for e in one(base, "ServiceMonitor")["spec"]["endpoints"]]
    api = FakeApiServer()
    async with (
        SimFleet(1, "sim/model", config=SimConfig(speed=20.0)) as fleet,
        BackgroundServer(api.app()) as apiserver,
    ):
        config = tmp_path / "kubeconfig"
        config.write_text(kubeconfig(apiserver.url))
        settings = load_settings(
            k8s_namespace="ns",
            kubeconfig=config,
            snapshot_path=tmp_path / "index.snap",
            health_interval_s=0.2,
            log_level="warning",
        )
        async with (
            BackgroundServer(create_app(settings, metrics=Metrics())) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=10.0, trust_env=False) as http,
        ):
            assert (await http.get(probes["startupProbe"])).status_code == 200
            assert (await http.get(probes["livenessProbe"])).status_code == 200
            assert (await http.get(probes["readinessProbe"])).status_code == 503  # no engine
            metrics = await http.get(scrape)
            assert metrics.status_code == 200 and "kvroute_build_info{" in metrics.text

            (entry,) = fleet.fleet_entries()

            def port(endpoint: object) -> str:
                return str(endpoint).rsplit(":", 1)[1].rstrip("/")

            api.put(
                pod(
                    str(entry["name"]),
                    "127.0.0.1",
                    annotations={
                        "kvroute.io/model": "sim/model",
                        "kvroute.io/port": port(entry["url"]),
                        "kvroute.io/events-port": port(entry["events"]),
                        "kvroute.io/replay-port": port(entry["replay"]),
                    },
                )
            )

            async def ready() -> bool:
                return (await http.get(probes["readinessProbe"])).status_code == 200

            await eventually(ready, "ready once a vLLM pod is Ready and its engine healthy")
            assert (await http.get(probes["livenessProbe"])).status_code == 200


# --- RBAC: what discovery asks the API server for -----------------------------------------------


class _Recorder:
    """An ASGI wrapper keeping (method, path, query) of every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = parse_qs(scope["query_string"].decode())
            self.requests.append((scope["method"], scope["path"], query))
        await self.app(scope, receive, send)


def rbac_request(method: str, path: str, query: dict[str, list[str]]) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) the API server authorizes a request as."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":  # /api/v1/...: the core group
        group, rest = "", parts[2:]
    elif parts[0] == "apis":  # /apis/GROUP/VERSION/...
        group, rest = parts[1], parts[3:]
    else:
        raise AssertionError(f"not a resource request: {path}")
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    resource, named = rest[0], len(rest) > 1
    watch = (query.get("watch") or ["false"])[0].lower() in ("1", "t", "true")
    verbs = {
        "GET": "watch" if watch else ("get" if named else "list"),
        "HEAD": "get" if named else "list",
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }
    return group, resource, verbs[method]


def granted(role: Doc) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"a wildcard in the Role's {field}"
        assert not rule.get("resourceNames"), "resourceNames: not what discovery relies on"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.update((group, resource, verb) for verb in rule["verbs"])
    return out


@pytest.fixture
async def discovery_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    """Runs discovery against the stand-in API server until it has listed and watched; returns
    the (apiGroup, resource, verb) of every request it made."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    async def run(target: KubernetesTarget, api: FakeApiServer) -> set[tuple[str, str, str]]:
        recorder = _Recorder(api.app())
        async with BackgroundServer(recorder) as server:
            config = tmp_path / "kubeconfig"
            config.write_text(kubeconfig(server.url, target.namespace))
            source = KubernetesFleetSource(
                target,
                lambda: kubernetes_api_client(config),
                watch_timeout_s=30,
                backoff_s=(0.01, 0.05),
                request_timeout_s=5,
                rng=random.Random(0),
            )
            stream = source.watch()
            try:
                assert [s.name for s in await asyncio.wait_for(anext(stream), 10)] == ["a"]
                api.put(pod("b", "10.0.0.2"))  # arrives through the watch
                assert [s.name for s in await asyncio.wait_for(anext(stream), 10)] == ["a", "b"]
            finally:
                await stream.aclose()
        assert not source.errors, dict(source.errors)
        return {rbac_request(*r) for r in recorder.requests}

    yield run


def _pool(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "selector": {"matchLabels": {"kvroute.io/engine": "vllm"}},
            "targetPorts": [{"number": 8000}],
        },
    }


async def test_role_grants_exactly_what_discovery_asks_for(
    base: list[Doc], discovery_requests: Callable[..., Any]
) -> None:
    env = container_env(base)
    api = FakeApiServer()
    api.put(pod("a", "10.0.0.1"))
    used = await discovery_requests(
        KubernetesTarget("ns", label_selector=env["KVROUTE_K8S_LABEL_SELECTOR"]), api
    )
    assert used == {("", "pods", "list"), ("", "pods", "watch")}
    assert granted(one(base, "Role")) == used


async def test_inference_pool_role_grants_exactly_what_discovery_asks_for(
    discovery_requests: Callable[..., Any],
) -> None:
    """The inference-pool overlay's Role (its patch replaces the base's rules whole)."""
    (role,) = load_yaml_docs(BASE.parent / "overlays" / "inference-pool" / "role.yaml")
    (settings_patch,) = load_yaml_docs(
        BASE.parent / "overlays" / "inference-pool" / "settings.yaml"
    )
    pool = settings_patch["data"]["KVROUTE_K8S_INFERENCE_POOL"]
    api = FakeApiServer()
    api.pools[pool] = _pool(pool)
    api.put(pod("a", "10.0.0.1"))
    used = await discovery_requests(KubernetesTarget("ns", inference_pool=pool), api)
    assert ("inference.networking.k8s.io", "inferencepools", "get") in used
    assert granted(role) == used


def test_rbac_request_mapping() -> None:
    assert rbac_request("GET", "/api/v1/namespaces/ns/pods", {}) == ("", "pods", "list")
    assert rbac_request("GET", "/api/v1/namespaces/ns/pods", {"watch": ["true"]}) == (
        "", "pods", "watch",
    )  # fmt: skip
    assert rbac_request("GET", "/api/v1/namespaces/ns/pods/p", {}) == ("", "pods", "get")
    assert rbac_request(
        "GET", "/apis/inference.networking.k8s.io/v1/namespaces/ns/inferencepools/x", {}
    ) == ("inference.networking.k8s.io", "inferencepools", "get")
    assert rbac_request("GET", "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices", {}) == (
        "discovery.k8s.io", "endpointslices", "list",
    )  # fmt: skip


# --- kustomize ----------------------------------------------------------------------------------


def _key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@NEEDS_KUSTOMIZE
def test_kustomize_renders_the_base_as_the_loader_does(base: list[Doc]) -> None:
    rendered = render(BASE)
    assert sorted(map(_key, rendered)) == sorted(map(_key, base))
    ours = {_key(d): d for d in base}
    for doc in rendered:
        assert doc == ours[_key(doc)], f"{_key(doc)} differs from kustomize's rendering"


@NEEDS_KUSTOMIZE
@pytest.mark.parametrize("overlay", OVERLAYS, ids=_overlay_id)
def test_overlay_renders_and_checks_out(overlay: Path) -> None:
    docs = render(overlay)
    _validate_schemas(docs)
    env = _check_settings(docs)
    (container,) = containers(one(docs, "Deployment"))
    ports = _ports(container)
    assert ports["http"] == int(env["KVROUTE_PORT"])
    if "KVROUTE_PICKER_PORT" in env:  # the endpoint picker: on the container and the Service
        assert ports["picker"] == int(env["KVROUTE_PICKER_PORT"])
        service_targets = {p["targetPort"] for p in one(docs, "Service")["spec"]["ports"]}
        assert "picker" in service_targets
    if "KVROUTE_K8S_INFERENCE_POOL" in env:
        role = granted(one(docs, "Role"))
        assert ("inference.networking.k8s.io", "inferencepools", "get") in role
        assert "KVROUTE_K8S_LABEL_SELECTOR" not in env  # ignored with a pool: not set


def test_the_image_is_the_projects_version() -> None:
    # `make image` tags kvroute:VERSION (pyproject.toml); the base deploys that tag.
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    (image,) = kustomization(BASE)["images"]
    assert (image["name"], image["newName"], image["newTag"]) == ("kvroute", "kvroute", version)
    (container,) = containers(one(load_base(), "Deployment"))
    assert container["image"] == f"kvroute:{version}"


def test_an_overlay_exists() -> None:
    assert [p.name for p in OVERLAYS] == ["inference-pool"]
