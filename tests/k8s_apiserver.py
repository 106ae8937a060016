"""A stand-in for kube-apiserver's pod list/watch and InferencePool get, faithful to the protocol
the real client relies on (docs/notes/issue-11-research.md §B), driven by tests."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _matches(obj: dict[str, Any] | None, selector: str) -> bool:
    """Equality (`k=v`, `k==v`, `k!=v`) and existence (`k`, `!k`) terms, ANDed."""
    if obj is None:
        return False
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class _Change:
    version: int
    kind: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    old: dict[str, Any] | None
    new: dict[str, Any] | None


@dataclass
class FakeApiServer:
    """Pods of one namespace with a change history; `put`, `delete`, `bookmark`, `expire`,
    `end_watches` and `cut_watches` drive it. What clients asked is kept in `lists`/`watches`."""

    namespace: str = "ns"
    version: int = 100
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[_Change] = field(default_factory=list)
    oldest: int = 0  # watches from a version below this get 410 Gone
    gone_as_http: bool = False  # 410 as an HTTP status (else: 200, then an ERROR event)
    forbidden: bool = False
    lists: list[dict[str, str]] = field(default_factory=list)
    watches: list[dict[str, str]] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _epoch: int = 0  # bumped by end_watches / cut_watches
    _cut: bool = False
    bookmarks_sent: int = 0

    # --- what tests do ----------------------------------------------------------------------

    def put(self, pod: dict[str, Any]) -> None:
        pod = copy.deepcopy(pod)
        name = pod["metadata"]["name"]
        self.version += 1
        pod["metadata"]["namespace"] = self.namespace
        pod["metadata"]["resourceVersion"] = str(self.version)
        old = self.pods.get(name)
        self.pods[name] = pod
        self._record("MODIFIED" if old is not None else "ADDED", old, pod)

    def delete(self, name: str) -> None:
        old = self.pods.pop(name)
        self.version += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self.version)
        self._record("DELETED", old, gone)

    def bookmark(self) -> None:
        self._record("BOOKMARK", None, None)

    def expire(self) -> None:
        """Compact the history: every version before now is gone (watches from it get 410)."""
        self.oldest = self.version + 1
        self.history.clear()

    def end_watches(self) -> None:
        """Close open watches cleanly, as at timeoutSeconds."""
        self._epoch += 1
        self._wake.set()

    def cut_watches(self) -> None:
        """Break open watches in the middle of an event, as a dropped connection would."""
        self._cut = True
        self._epoch += 1
        self._wake.set()

    def _record(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        self.history.append(_Change(self.version, kind, old, new))
        self._wake.set()

    # --- the HTTP side ----------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/v1/namespaces/{ns}/pods", self._pods, methods=["GET"]),
                Route(
                    "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools/{name}",
                    self._pool,
                    methods=["GET"],
                ),
            ]
        )

    async def _pool(self, request: Request) -> Response:
        pool = self.pools.get(request.path_params["name"])
        if pool is None:
            return JSONResponse(_status(404, "NotFound", "inferencepools not found"), 404)
        return JSONResponse(pool)

    async def _pods(self, request: Request) -> Response:
        query = dict(request.query_params)
        if self.forbidden:
            verb = "watch" if query.get("watch") in _TRUE else "list"
            message = (
                f'pods is forbidden: User "system:serviceaccount:{self.namespace}:kvroute" '
                f'cannot {verb} resource "pods" in API group "" in the namespace '
                f'"{self.namespace}"'
            )
            return JSONResponse(_status(403, "Forbidden", message), 403)
        if query.get("watch") in _TRUE:
            self.watches.append(query)
            return await self._watch(query)
        self.lists.append(query)
        return self._list(query)

    def _list(self, query: dict[str, str]) -> Response:
        selector = query.get("labelSelector", "")
        items = [p for _, p in sorted(self.pods.items()) if _matches(p, selector)]
        start = int(query.get("continue") or 0)
        limit = int(query.get("limit") or 0) or len(items) or 1
        page = items[start : start + limit]
        metadata: dict[str, Any] = {"resourceVersion": str(self.version)}
        if start + limit < len(items):
            metadata["continue"] = str(start + limit)
        return JSONResponse(
            {"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": page}
        )

    async def _watch(self, query: dict[str, str]) -> Response:
        since = int(query.get("resourceVersion") or 0)
        if since and since < self.oldest:
            gone = _status(410, "Expired", f"too old resource version: {since} ({self.version})")
            if self.gone_as_http:
                return JSONResponse(gone, 410)
            return StreamingResponse(
                _lines([{"type": "ERROR", "object": gone}]), media_type="application/json"
            )
        return StreamingResponse(self._events(query, since), media_type="application/json")

    async def _events(self, query: dict[str, str], since: int) -> AsyncIterator[bytes]:
        selector = query.get("labelSelector", "")
        bookmarks = query.get("allowWatchBookmarks") in _TRUE
        deadline = asyncio.get_running_loop().time() + float(query.get("timeoutSeconds") or 1800)
        epoch = self._epoch
        sent = 0  # index into history of the next change to consider
        while True:
            while sent < len(self.history):
                change = self.history[sent]
                sent += 1
                if change.version <= since and change.kind != "BOOKMARK":
                    continue
                event = self._event(change, selector, bookmarks)
                if event is not None:
                    self.bookmarks_sent += event["type"] == "BOOKMARK"
                    yield (json.dumps(event) + "\n").encode()
            if self._epoch != epoch:
                if self._cut:
                    self._cut = False
                    yield b'{"type":"MODIFIED","object":{"kind":"Pod","metad'
                    raise ConnectionResetError("the test cut the watch")
                return
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(remaining, 0.5))

    def _event(self, change: _Change, selector: str, bookmarks: bool) -> dict[str, Any] | None:
        if change.kind == "BOOKMARK":
            if not bookmarks:
                return None
            meta = {"resourceVersion": str(change.version)}
            return {
                "type": "BOOKMARK",
                "object": {"kind": "Pod", "apiVersion": "v1", "metadata": meta},
            }
        was, now = _matches(change.old, selector), _matches(change.new, selector)
        if change.kind == "DELETED":
            return {"type": "DELETED", "object": change.new} if was else None
        if now and not was:
            return {"type": "ADDED", "object": change.new}
        if was and not now:  # relabelled out of the selector: gone for this watch
            return {"type": "DELETED", "object": change.new}
        return {"type": change.kind, "object": change.new} if now else None


async def _lines(events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for event in events:
        yield (json.dumps(event) + "\n").encode()


def kubeconfig(server_url: str, namespace: str = "ns") -> str:
    """A kubeconfig whose only cluster is `server_url` (plain http), with a bearer token."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": server_url}}],
            "users": [{"name": "kvroute", "user": {"token": "test-token"}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "kvroute", "namespace": namespace},
                }
            ],
            "current-context": "fake",
        }
    )


def pod(
    name: str,
    ip: str = "10.0.0.1",
    *,
    ready: bool = True,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A vLLM pod as the API server returns it (labels default to the discovery selector's)."""
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "labels": {"kvroute.io/engine": "vllm"} if labels is None else labels,
            "annotations": {"kvroute.io/model": "m"} if annotations is None else annotations,
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
