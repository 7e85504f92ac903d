# etcd-syncer: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
RELEASE_BIN := target/release/etcd-syncer
DEBUG_BIN := target/debug/etcd-syncer

.PHONY: all deps build release demo test unit e2e e2e-long lint bench bench-quick chart-tools chart-test docs clean

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

## make test: unit and property tests, the end-to-end suite against real etcd
## (and a real Prometheus), then the chart and alert-rule validation.
test: deps chart-tools
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --lib --bins
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
