"""deploy/container/Containerfile, read and checked without a container engine: two stages, the
C extensions built in the first with a compiler the second never gets, only runtime extras,
a numeric non-root user the Deployment agrees with, `kvroute serve` on the port the manifests
use, and a build context that keeps local builds and virtual environments out."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field

import pytest

from kvroute.settings import Settings, settings_env_names
from tests.deploy.manifests import CONTAINERFILE, ROOT, containers, load_base, one, pod_spec

# Extras that are tools for developing kvroute, never for running it.
DEV_EXTRAS = frozenset({"test", "bench", "demo"})
SETTINGS_ENV = frozenset(n for f in Settings.model_fields for n in settings_env_names(f))


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def run_text(self) -> str:
        return "\n".join(self.all("RUN"))


def parse(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Instructions before the first FROM (global ARGs), and the stages. Comments and blank
    lines go; a line ending in a backslash continues on the next (comments inside a continued
    instruction are dropped, as the builders do)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the file ends in a line continuation"
    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            preamble.append(instruction)
    return preamble, stages


@pytest.fixture(scope="module")
def containerfile() -> tuple[list[Instruction], list[Stage]]:
    return parse(CONTAINERFILE.read_text(encoding="utf-8"))


def _arg_default(stage_or_preamble: list[Instruction], name: str) -> str | None:
    for i in stage_or_preamble:
        if i.keyword == "ARG" and i.args.split("=", 1)[0] == name:
            return i.args.split("=", 1)[1] if "=" in i.args else None
    return None


def test_two_stages_on_one_base_image(containerfile: tuple[list[Instruction], list[Stage]]) -> None:
    preamble, stages = containerfile
    assert [s.name for s in stages] == ["build", "runtime"]
    build, runtime = stages
    # The venv built in `build` is copied into `runtime` and points at its Python: same image.
    assert build.base == runtime.base == "${PYTHON_IMAGE}"
    image = _arg_default(preamble, "PYTHON_IMAGE")
    assert image is not None and re.fullmatch(r"python:3\.1[1-9][.\d]*-slim(-\w+)?", image), image
    copies = runtime.all("COPY")
    assert copies == ["--from=build /opt/kvroute /opt/kvroute"]


def test_the_build_stage_compiles_the_c_extensions(
    containerfile: tuple[list[Instruction], list[Stage]],
) -> None:
    build = containerfile[1][0]
    run = build.run_text()
    assert re.search(r"apt-get install .*\bgcc\b", run)
    assert "KVROUTE_REQUIRE_NATIVE=1 pip wheel" in run  # a failed C build fails the image
    assert "import kvroute.index._native, kvroute.events._recv" in run
    # What the build copies in is what setup.py and pyproject.toml need.
    copied = " ".join(build.all("COPY")).split()
    for needed in ("pyproject.toml", "setup.py", "README.md", "src"):
        assert needed in copied
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    for source in re.findall(r'sources=\["([^"]+)"\]', setup):
        assert source.startswith("src/"), source


def test_the_runtime_stage_has_no_build_or_dev_tools(
    containerfile: tuple[list[Instruction], list[Stage]],
) -> None:
    runtime = containerfile[1][1]
    run = runtime.run_text()
    assert "apt-get" not in run and "gcc" not in run
    assert "pip " not in run  # nothing is installed here: the venv comes built
    assert not runtime.all("ADD")


def test_only_runtime_extras_are_installed(
    containerfile: tuple[list[Instruction], list[Stage]],
) -> None:
    build, runtime = containerfile[1]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = set(pyproject["project"]["optional-dependencies"])
    assert extras >= DEV_EXTRAS
    defaults = {_arg_default(s.instructions, "EXTRAS") for s in (build, runtime)}
    assert len(defaults) == 1, "the two stages default EXTRAS differently"
    (default,) = defaults
    assert default is not None
    chosen = set(default.split(","))
    assert "kubernetes" in chosen  # pod discovery, what the manifests run
    assert chosen <= extras - DEV_EXTRAS, chosen
    # The install names no extra of its own, and pip runs only in the build stage's venv.
    run = build.run_text()
    assert re.findall(r"\[([^\]$]+)\]", run) == []
    assert "${EXTRAS:+[$EXTRAS]}" in run


def test_non_root_numeric_user_matching_the_deployment(
    containerfile: tuple[list[Instruction], list[Stage]],
) -> None:
    runtime = containerfile[1][1]
    users = runtime.all("USER")
    assert users, "the runtime stage sets no USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"USER {users[-1]}: expected a numeric uid[:gid]"
    uid, gid = int(match[1]), int(match[2] or match[1])
    assert uid > 0 and gid > 0
    # USER is the last thing that could change who runs the entry point.
    keywords = [i.keyword for i in runtime.instructions]
    assert "RUN" not in keywords[keywords.index("USER") :]
    spec = pod_spec(one(load_base(), "Deployment"))
    assert spec is not None
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (
        uid,
        gid,
    )


def test_entrypoint_port_and_environment(
    containerfile: tuple[list[Instruction], list[Stage]],
) -> None:
    runtime = containerfile[1][1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["kvroute", "serve"]  # exec form: signals reach kvroute
    assert not runtime.all("CMD")
    assert not runtime.all("HEALTHCHECK")  # Kubernetes probes the pod (deployment.yaml)
    (exposed,) = runtime.all("EXPOSE")
    port = int(exposed.split("/")[0])
    assert port == Settings.model_fields["port"].default
    base = load_base()
    (container,) = containers(one(base, "Deployment"))
    assert {p["containerPort"] for p in container["ports"]} == {port}
    env: dict[str, str] = {}
    for args in runtime.all("ENV"):
        for word in shlex.split(args):
            name, _, value = word.partition("=")
            env[name] = value
    kvroute_env = {n for n in env if n.startswith("KVROUTE_")}
    assert kvroute_env <= SETTINGS_ENV, kvroute_env - SETTINGS_ENV
    assert env["KVROUTE_INDEX_IMPL"] == "native"  # the image always has the C core
    assert env["PATH"].startswith("/opt/kvroute/bin:")


def _glob_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex, as the builders match it (Go's filepath.Match plus
    `**`): `*` and `?` stay within one path segment, `**/` spans any number of them."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return out


def _ignored(patterns: list[str], path: str) -> bool:
    """Whether the build context leaves `path` out: the last matching pattern wins, `!`
    re-includes, and a pattern that matches a directory covers what is under it."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_build_context_keeps_local_builds_out() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "src/kvroute/index/_native.cpython-311-x86_64-linux-gnu.so",
        "src/kvroute/events/_recv.cpython-311-x86_64-linux-gnu.so",
        "src/kvroute/__pycache__/cli.cpython-311.pyc",
        "src/kvroute.egg-info/PKG-INFO",
        "bench-results/demo.json",
    ):
        assert _ignored(patterns, path), f"{path} would be sent to the builder"
    for path in ("pyproject.toml", "setup.py", "README.md", "src/kvroute/index/_native.c"):
        assert not _ignored(patterns, path), f"{path} is needed by the build stage"


def test_ignore_patterns_match_as_the_builders_do() -> None:
    assert _ignored(["*.egg-info"], "kvroute.egg-info/PKG-INFO")
    assert not _ignored(["*.egg-info"], "src/kvroute.egg-info/PKG-INFO")  # `*` stops at `/`
    assert _ignored(["**/*.so"], "a.so") and _ignored(["**/*.so"], "src/x/a.so")
    assert not _ignored(["tests", "!tests"], "tests/x.py")


def test_parser_reads_continuations_and_stages() -> None:
    preamble, stages = parse(
        "# syntax=docker/dockerfile:1\nARG X=1\nFROM a AS one\nRUN echo \\\n  # note\n  b\n"
        "FROM --platform=linux/amd64 c\nUSER 5\n"
    )
    assert [i.args for i in preamble] == ["X=1"]
    assert [(s.base, s.name) for s in stages] == [("a", "one"), ("c", None)]
    assert stages[0].all("RUN") == ["echo b"]
    assert stages[1].all("USER") == ["5"]
