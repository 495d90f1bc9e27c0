#!/usr/bin/env bash
# Routing inbound benchmark: the real routing service (release build, in-process through the
# `bench_inbound` example) against the local PostgreSQL and RabbitMQ, each run on its own
# database and AMQP prefix. It measures, in one run:
#   ceiling - a bare consumer that only acks (multiple every 64) N of the same events from a
#             quorum queue: the broker's share, as the reference for the ratio;
#   drain   - N realistic inbound events (70 % customer texts over 2,000 customers, bot
#             messages, delivery updates, 5 % images that notify) pre-filled into the shard
#             queues, then routing starts: events/s until the last one is committed;
#   latency - events published at BENCH_RATE/s for BENCH_SECONDS while routing runs: time from
#             each event's received_at (stamped at publish, as ingress does) to routing's commit.
#
# Settings: BENCH_EVENTS (20000), BENCH_RATE (1000, the rate of the p99 target), BENCH_SECONDS
# (10), ROUTING_SHARDS (cores), ROUTING_BATCH_SIZE (128), TEST_DATABASE_URL, TEST_AMQP_URL,
# CARGO_TARGET_DIR.
# Prints a markdown table; record it in deploy/BENCHMARKS.md ("Routing").
# Every SQL statement routing runs, with its time, is logged with TEST_LOG=1
# RUST_LOG=sqlx::query=debug (to count round trips per event).
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${BENCH_EVENTS:-20000}
RATE=${BENCH_RATE:-1000}
SECONDS_=${BENCH_SECONDS:-10}
# One shard per core by default: each shard commits its own batches, and more shards than
# cores only make more, smaller transactions (on 2 cores at 1,000/s: p99 10-12 ms with 2
# shards against 14-26 ms with 4, see BENCHMARKS.md).
SHARDS=${ROUTING_SHARDS:-$(nproc)}
BATCH=${ROUTING_BATCH_SIZE:-128}

echo "building (release)..." >&2
[[ -n "${BENCH_SKIP_BUILD:-}" ]] || cargo build --release -p shopctrl-routing --example bench_inbound >&2
BIN=${CARGO_TARGET_DIR:-target}/release/examples/bench_inbound

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$BIN" --events "$EVENTS" --rate "$RATE" --seconds "$SECONDS_" --shards "$SHARDS" --batch-size "$BATCH"
