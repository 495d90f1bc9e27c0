# ShopCtrl Messaging: the two set-up commands are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: help infra build run test test-rust test-e2e test-reliability check-chart lint fmt bench

help:
	@echo "make run               start PostgreSQL/Redis/RabbitMQ if needed, build, start every service and a demo"
	@echo "make test              start the infrastructure if needed, run every test (Rust, chart, compose)"
	@echo "make test-e2e          the whole-stack suites: end-to-end rules, traces, faults survived"
	@echo "make test-reliability  the fault suite alone (faults through TCP proxies the test controls)"
	@echo "make bench             the benchmarks, with ratios against the raw ceilings measured in the same run"
	@echo "make lint / make fmt   clippy with -D warnings / rustfmt"

infra:
	@bash deploy/ensure-infra.sh

build:
	$(CARGO) build --release --locked --workspace --bins

run: infra build
	@bash deploy/run-local.sh

test: infra lint test-rust test-e2e check-chart

# Every crate's unit and integration tests against the real PostgreSQL, Redis and RabbitMQ, and
# the simulator's own tests. The whole-stack suites of tests/tests (end to end, traces, faults
# survived) run under test-e2e, which make test runs too.
test-rust:
	$(CARGO) build --locked --workspace --bins
	$(CARGO) test --locked --workspace --all-targets --no-fail-fast --exclude shopctrl-e2e
	$(CARGO) test --locked -p shopctrl-e2e --lib --bins

test-e2e: infra
	$(CARGO) build --locked --workspace --bins
	$(CARGO) test --locked -p shopctrl-e2e --tests -- --nocapture

test-reliability: infra
	$(CARGO) build --locked --workspace --bins
	$(CARGO) test --locked -p shopctrl-e2e --test reliability -- --nocapture

check-chart:
	@bash deploy/check-chart.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: infra
	@bash deploy/bench.sh
