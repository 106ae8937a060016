"""Loading deploy/kubernetes: the base rendered by a small loader of our own (what
tests/deploy/test_manifests.py always checks, no tool needed), or any kustomization rendered
by `kubectl kustomize` / `kustomize build` when one is installed."""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAYS = sorted(p.parent for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"

Doc = dict[str, Any]

# Kinds this project deploys that live outside any namespace (none today; the loader must not
# give them one if one is added).
_CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding"})
# What the loader below implements of a kustomization; a base using more must be rendered by
# kustomize, and the test says so instead of checking something else than kubectl would apply.
LOADER_FIELDS = frozenset({"apiVersion", "kind", "namespace", "labels", "resources", "images"})


def load_yaml_docs(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomization(directory: Path) -> Doc:
    (doc,) = load_yaml_docs(directory / "kustomization.yaml")
    return doc


def load_base(directory: Path = BASE) -> list[Doc]:
    """The resources of a kustomization that lists plain files, with its `namespace`, `labels`
    (metadata only, as with includeSelectors and includeTemplates off) and `images` applied, as
    kustomize does."""
    k = kustomization(directory)
    unsupported = set(k) - LOADER_FIELDS
    if unsupported:
        raise ValueError(f"{directory}: the loader does not implement {sorted(unsupported)}")
    docs: list[Doc] = []
    for name in k.get("resources") or ():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{directory}: resource {name} is not a file")
        docs.extend(copy.deepcopy(load_yaml_docs(path)))
    namespace = k.get("namespace")
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if namespace and doc["kind"] not in _CLUSTER_SCOPED:
            meta["namespace"] = namespace
        for subject in doc.get("subjects") or ():
            if namespace and subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace
        for entry in k.get("labels") or ():
            if entry.get("includeSelectors") or entry.get("includeTemplates"):
                raise ValueError(f"{directory}: labels into selectors/templates not implemented")
            meta.setdefault("labels", {}).update(entry.get("pairs") or {})
        for container in containers(doc):
            for image in k.get("images") or ():
                if container.get("image", "").split(":")[0] == image["name"]:
                    name = image.get("newName", image["name"])
                    tag = image.get("newTag")
                    container["image"] = f"{name}:{tag}" if tag else name
    return docs


def kustomize_command() -> list[str] | None:
    """`kubectl kustomize` or `kustomize build`, whichever is installed; None if neither."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def render(directory: Path) -> list[Doc]:
    """`directory` rendered by the installed kustomize (callers skip when there is none)."""
    command = kustomize_command()
    assert command is not None
    result = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} {directory} failed:\n{result.stderr}")
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


def by_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[Doc], kind: str) -> Doc:
    (doc,) = by_kind(docs, kind)
    return doc


def pod_spec(doc: Doc) -> Doc | None:
    if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return None


def containers(doc: Doc) -> Iterator[Doc]:
    spec = pod_spec(doc)
    if spec is not None:
        yield from spec.get("initContainers") or ()
        yield from spec.get("containers") or ()


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
