# Two commands matter on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make demo` installs only what the demo needs (the `demo` extra); the full install above is a
# superset, so it satisfies the demo too (it touches this stamp).
DEMO_STAMP := $(VENV)/.installed-demo
NATIVE_SOURCES := src/kvroute/index/_native.c src/kvroute/events/_recv.c
PYTEST := $(PY) -m pytest
# Worker processes of `make test` and `make test-index-python` (pytest-xdist); 0: one process.
TEST_WORKERS ?= 2
# pytest exits 5 when a folder holds no tests yet; that is not a failure of the target.
RUN_TESTS = $(PYTEST) $(1) || [ $$? -eq 5 ]
SHARED ?= $(or $(KVROUTE_SHARED),../shared)
# The real vLLM CPU install (~2.5 GB) is cached here between runs.
VLLM_ROOT ?= $(HOME)/.cache/kvroute/vllm-cpu

.PHONY: venv demo test fuzz lint bench test-kv-sync test-zmq test-kv-sync-e2e \
        test-kv-sync-benchmark test-kv-sync-chaos test-kv-sync-all test-vllm clean \
        test-index-python test-native-asan bench-peers test-dashboard image

# The native index core (src/kvroute/index/_native.c) is built by this install; make insists
# on it (KVROUTE_REQUIRE_NATIVE=1) so broken C fails here instead of falling back quietly.
$(STAMP): pyproject.toml setup.py $(NATIVE_SOURCES)
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	KVROUTE_REQUIRE_NATIVE=1 $(PY) -m pip install -q -e '.[test,local-tokenizer,bench]'
	@touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml setup.py $(NATIVE_SOURCES)
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	KVROUTE_REQUIRE_NATIVE=1 $(PY) -m pip install -q -e '.[demo]'
	@touch $(DEMO_STAMP)

venv: $(STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/kvroute demo

test: $(STAMP)
	KVROUTE_INDEX_IMPL=native KVROUTE_RECEIVE_IMPL=native $(call RUN_TESTS,tests -q -p no:cacheprovider -n $(TEST_WORKERS))

# The index and event-path tests again on the pure-Python reference index and pyzmq's receive
# calls (`make test` runs everything on the native core and receive loop).
test-index-python: $(STAMP)
	KVROUTE_INDEX_IMPL=python KVROUTE_RECEIVE_IMPL=python $(call RUN_TESTS,tests/unit/index tests/unit/events tests/zmq/events -q -p no:cacheprovider -n $(TEST_WORKERS))

# The Grafana dashboard's every panel query against a real Prometheus (Debian's package,
# installed here when missing) scraping a gateway under load (tests/e2e/dashboard).
test-dashboard: $(STAMP)
	@command -v prometheus >/dev/null || { apt-get install -y -q prometheus >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null; }; }
	KVROUTE_REQUIRE_PROMETHEUS=1 $(call RUN_TESTS,tests/e2e/dashboard tests/e2e/gateway/test_observability.py -q -p no:cacheprovider)

# The index tests against the native core built with ASan + UBSan (tests/native_asan.sh).
test-native-asan: $(STAMP)
	bash tests/native_asan.sh

# 10^6 generated and mutated payloads through decode -> tracker -> both indexes, invariants
# checked after each (make test runs 20,000 of them; tests/fuzz/test_ingest_fuzz.py).
fuzz: $(STAMP)
	KVROUTE_INGEST_FUZZ_PAYLOADS=1000000 $(call RUN_TESTS,tests/fuzz -q -s -p no:cacheprovider)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/kvroute bench all --size full

# The peers of the side-by-side benchmarks, in their own venv (Dynamo's pydantic pin clashes with
# ours); CPU only, no CUDA needed: NVIDIA Dynamo's standalone indexer for `kvroute bench ingest
# --vs dynamo`, and vllm-router (the vLLM project's Rust router, a binary wheel) for
# `kvroute bench trace FILE --vs vllm-router`.
bench-peers:
	@[ -x .venv-peers/bin/python ] || $(PYTHON) -m venv .venv-peers
	.venv-peers/bin/python -m pip install -q --upgrade pip
	.venv-peers/bin/python -m pip install -q 'ai-dynamo-runtime==1.6.1' 'vllm-router==0.1.17'
	@echo "now: kvroute bench ingest --vs dynamo [--size smoke|full] [--events N]"
	@echo " or: kvroute bench trace FILE --vs vllm-router [--max-requests N]"

test-kv-sync: $(STAMP)
	$(call RUN_TESTS,tests/unit -q)

test-zmq: $(STAMP)
	$(call RUN_TESTS,tests/zmq -q)

test-kv-sync-e2e: $(STAMP)
	$(call RUN_TESTS,tests/e2e -q)

test-kv-sync-benchmark: $(STAMP)
	$(call RUN_TESTS,tests/benchmark -q)

test-kv-sync-chaos: $(STAMP)
	$(call RUN_TESTS,tests/chaos -q)

test-kv-sync-all: $(STAMP)
	$(call RUN_TESTS,tests -q)
	$(MAKE) test-vllm

# Two real vLLM engines (CPU build, tiny model) + `kvroute serve`; see tests/e2e/real_vllm.
test-vllm: $(STAMP)
	ROOT=$(VLLM_ROOT) INSTALL_ONLY=1 bash $(SHARED)/vllm-cpu/vllm_cpu_e2e.sh
	KVROUTE_REAL_VLLM=1 KVROUTE_VLLM_ROOT=$(VLLM_ROOT) KVROUTE_VLLM_LOGS=$(VLLM_ROOT)/logs \
		$(PYTEST) tests/e2e/real_vllm -q -s -p no:cacheprovider

# The container image (deploy/container/Containerfile) with podman or docker, whichever is
# installed and running; not part of `make test`, which checks the Containerfile without building
# it (tests/deploy). EXTRAS: the runtime extras, e.g. EXTRAS=kubernetes,picker; PYTHON_IMAGE:
# another base image (a mirror's copy of python:3.11-slim-bookworm, say).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= kvroute:$(VERSION)
EXTRAS ?= kubernetes
CONTAINER_ENGINE ?= $(shell command -v podman || command -v docker)
image:
	@[ -n "$(CONTAINER_ENGINE)" ] || { echo "make image: needs podman or docker"; exit 2; }
	@$(CONTAINER_ENGINE) info >/dev/null 2>&1 || \
		{ echo "make image: $(CONTAINER_ENGINE) cannot reach its engine (daemon not running?)"; exit 2; }
	$(CONTAINER_ENGINE) build -f deploy/container/Containerfile --build-arg EXTRAS=$(EXTRAS) \
		$(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) -t $(IMAGE) .
	$(CONTAINER_ENGINE) run --rm $(IMAGE) --help >/dev/null
	@echo "built $(IMAGE) (extras: $(EXTRAS))"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
	rm -f src/kvroute/index/_native*.so src/kvroute/events/_recv*.so
