# etcd-syncer: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
RELEASE_BIN := target/release/etcd-syncer
DEBUG_BIN := target/debug/etcd-syncer

.PHONY: all deps build release demo test unit sim mutants e2e e2e-long lint bench bench-quick chart-tools chart-test docs clean

all: build

deps:
	@scripts/ensure-deps.sh

build: deps
	$(CARGO) build --workspace --bins

release: deps
	$(CARGO) build --release --workspace --bins

## make demo: start a local source and destination etcd, write data, mirror it, show the result.
demo: release
	ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/demo

## make test: unit and property tests, the deterministic simulation (1,000
## seeds), the end-to-end suite against real etcd (and a real Prometheus),
## then the chart and alert-rule validation.
test: deps chart-tools
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test --test sim --test regressions --test layers -- --nocapture
	ETCD_SYNCER_BIN=$(abspath $(DEBUG_BIN)) scripts/gen-config-doc.sh --check
	$(MAKE) e2e
	$(MAKE) chart-test

chart-tools:
	@scripts/ensure-chart-tools.sh

## make chart-test: helm lint/template, kubernetes-validate, promtool, rendered config.
chart-test: chart-tools
	$(CARGO) build --bins
	ETCD_SYNCER_BIN=$(abspath $(DEBUG_BIN)) scripts/chart-test.sh

unit: deps
	$(CARGO) test --workspace --lib --bins

## make sim SEEDS=100000: more simulated fault schedules (release build).
## One seed: make sim SEED=1234 (prints its actions; SIM_LOG=debug for logs).
SEEDS ?= 10000
sim:
	SIM_SEEDS=$(SEEDS) $(if $(SEED),SIM_SEED=$(SEED)) $(CARGO) test --release --test sim -- --nocapture

## make mutants: cargo-mutants over the safety code (.cargo/mutants.toml),
## with the unit and simulation tests only.
mutants:
	@command -v cargo-mutants >/dev/null 2>&1 || $(CARGO) install --locked cargo-mutants
	SIM_SEEDS=200 $(CARGO) mutants --timeout 120 -j 1

e2e: deps
	$(CARGO) build --workspace --bins
	ETCD_SYNCER_BIN=$(abspath $(DEBUG_BIN)) $(CARGO) test -p e2e --tests

e2e-long: deps
	$(CARGO) build --workspace --bins
	ETCD_SYNCER_BIN=$(abspath $(DEBUG_BIN)) $(CARGO) test -p e2e --tests -- --ignored

## make bench: etcd-syncer vs etcdctl make-mirror; writes docs/benchmarks.md.
bench: release
	ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

bench-quick: release
	BENCH_QUICK=1 ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

## make docs: regenerate docs/configuration.md from --help.
docs:
	$(CARGO) build --bins
	ETCD_SYNCER_BIN=$(abspath $(DEBUG_BIN)) scripts/gen-config-doc.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
