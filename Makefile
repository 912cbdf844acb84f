# The front door: `make run` serves the demo table, `make test` runs lint and the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCKED := $(VENV)/.locked
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# Every install comes from a lock in requirements/ (exact versions, sha256 hashes), resolved
# by `make lock` from pyproject.toml's ranges as PyPI stood at LOCK_DATE. To upgrade: `make
# outdated`, move LOCK_DATE, `make lock`, `make test`, commit the locks with the date.
LOCK_DATE := 2026-12-07T00:00:00Z
# torch's CPU build (the locks' torch==2.13.0+cpu): this machine kind keeps its wheel in
# /opt/wheels, where pip looks; elsewhere it comes from PyTorch's CPU index.
ifeq ($(wildcard /opt/wheels/torch-*+cpu-*.whl),)
export PIP_EXTRA_INDEX_URL ?= https://download.pytorch.org/whl/cpu
endif

COMPOSE := docker compose -f docker/docker-compose.yml

.PHONY: help venv system-deps run test lint format proto lock outdated clean \
	compose-up compose-up-cpu compose-down kubernetes kube-play container-deps smoke compose-smoke mutate screenshot soak bench bench-kernels bench-service bench-cache bench-ranking \
	device-wheels

help:
	@echo "make run     start the server on the seeded demo table (gRPC :50051, metrics :8000)"
	@echo "make test    lint (ruff, mypy) and run the test suite"
	@echo "make lint    ruff check, ruff format --check, mypy"
	@echo "make format  ruff format and ruff check --fix"
	@echo "make proto   regenerate client/embedding_client/proto from protos/"
	@echo "make lock    re-resolve requirements/*.txt (pins and hashes) as of LOCK_DATE"
	@echo "make outdated   what is newer on PyPI than the locks (upgrading is a decision)"
	@echo "make compose-up / compose-up-cpu / compose-down   server + Prometheus + Grafana"
	@echo "make kubernetes   regenerate deploy/kubernetes/embedding-2x2.yaml (SHARDS=N REPLICAS=R: stdout)"
	@echo "make compose-smoke   docker-compose.yml itself under podman-compose: Redis + server + Prometheus"
	@echo "make kube-play    2 shards x 2 replicas under podman kube play, a pod killed under load"
	@echo "make smoke   build and run the image with podman, check health, lookup, scrape"
	@echo "make screenshot   Prometheus p99 graph of both RPCs after traffic (docs/)"
	@echo "make soak    60 s at 64 concurrent calls: errors, latency percentiles, RSS"
	@echo "make bench   kernel, service and device-cache benchmarks: tables and plots in bench/results/"
	@echo "make bench-ranking   LookupMany over 26 Criteo-sized tables vs bare servers (needs h2load)"
	@echo "make device-wheels   wheels for bench/device.sh, the GPU measurements on a lent machine"
	@echo "make mutate MODULE=codec   mutation testing (mutmut) of one core module, resumable"
	@echo "make clean   remove .venv and caches"

# A changed lock makes a new venv (nothing left over from the old one); a changed
# pyproject.toml only reinstalls the project (editable, no dependencies, no build isolation).
$(LOCKED): requirements/dev.txt
	rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --require-hashes -r requirements/dev.txt
	touch $@

$(STAMP): $(LOCKED) pyproject.toml
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

venv: $(STAMP)

# Debian's prometheus (with promtool) for the observability tests and redis-server for the
# update log's, when missing.
system-deps:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null \
		&& command -v redis-server >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			prometheus redis-server >/dev/null; \
	else echo "warning: prometheus or redis-server not installed and not root: tests needing them will skip"; fi

run: $(STAMP)
	$(BIN)/embedding-server $(ARGS)

test: lint system-deps
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: $(STAMP)
	$(BIN)/python protos/generate.py

# podman and what it needs here (DESIGN.md), for make smoke and make kube-play, when missing.
container-deps:
	@if command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
		&& { command -v catatonit >/dev/null || [ -x /usr/libexec/podman/catatonit ]; }; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc catatonit debootstrap >/dev/null; \
	else echo "warning: podman not installed and not root: make smoke and make kube-play will skip"; fi

kube-play: $(STAMP)
	deploy/kubernetes/play.sh

compose-smoke: $(STAMP)
	docker/compose-smoke.sh

# Mutation testing, outside CI's time budget (hours for all modules on 2 cores).
mutate: $(STAMP)
	mutation/run.sh $(or $(MODULE),codec)

# Kubernetes manifests for N shards x R replicas; the checked-in 2 x 2 when none is given.
kubernetes: $(STAMP)
	@if [ -n "$(SHARDS)$(REPLICAS)" ]; then \
		$(BIN)/python deploy/kubernetes/generate.py --shards $${SHARDS:-2} --replicas $${REPLICAS:-2}; \
	else $(BIN)/python deploy/kubernetes/generate.py > deploy/kubernetes/embedding-2x2.yaml; fi

lock: $(STAMP)
	requirements/lock.sh $(BIN)/uv $(LOCK_DATE)

# The locks resolved as of now, into a scratch folder, against the checked-in ones; then
# what is newer still, past pyproject's ranges (a range or a pin there to move first).
outdated: $(STAMP)
	@rm -rf .lock-now && requirements/lock.sh $(BIN)/uv $$(date -u +%Y-%m-%dT%H:%M:%SZ) .lock-now
	@$(BIN)/python requirements/locks.py requirements .lock-now; status=$$?; rm -rf .lock-now; exit $$status
	@echo; echo "newest releases of what .venv holds (past pyproject's ranges too):"
	@$(BIN)/python -m pip list --outdated --exclude-editable --disable-pip-version-check 2>/dev/null

# Benchmarks print markdown tables and write plots under bench/results/.
bench: bench-kernels bench-service bench-cache

bench-kernels: $(STAMP)
	$(BIN)/python bench/kernels.py

bench-service: $(STAMP)
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq redis-server >/dev/null; } \
		|| echo "warning: redis-server not installed: the Redis comparison is skipped"
	$(BIN)/python bench/service.py

bench-cache: $(STAMP)
	$(BIN)/python bench/cache.py

# The ranking call, driven by h2load (Debian's nghttp2-client) so the load generator is not the limit.
bench-ranking: $(STAMP)
	@command -v h2load >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq nghttp2-client >/dev/null; }
	cd bench && ../$(BIN)/python ranking.py --out results

# The Python packages a lent GPU machine (Python 3.12, x86-64, no network) lacks, at the
# versions the suite runs with here, for bench/device.sh: `carry` .whl with each call.
DEVICE_WHEELS := grpcio grpcio-health-checking grpcio-reflection protobuf cryptography cffi pycparser
device-wheels: $(STAMP)
	rm -rf .whl
	$(BIN)/python -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp -d .whl \
		$(foreach n,28 27 17,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64 \
		$$($(BIN)/python -m pip freeze | grep -i -E '^($(subst $() ,|,$(DEVICE_WHEELS)))==')
	@ls .whl && du -sh .whl

# 60 s at 64 concurrent calls against a real server: calls, errors, latency, RSS.
soak: $(STAMP)
	$(BIN)/python bench/soak.py --seconds 60 --concurrency 64

compose-up:
	$(COMPOSE) up -d --build

compose-up-cpu:
	$(COMPOSE) -f docker/docker-compose.cpu.yml up -d --build

compose-down:
	$(COMPOSE) down

smoke: $(STAMP)
	docker/smoke.sh

screenshot: $(STAMP)
	docker/screenshot.sh docs/prometheus-p99.png

clean:
	rm -rf $(VENV) .venv-foreign .pytest_cache .mypy_cache .ruff_cache *.egg-info
