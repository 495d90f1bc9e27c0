#!/usr/bin/env python3
"""PromQL checks for the alert rules and the Grafana dashboard (used by deploy/check-chart.sh).

Every expression must parse (promql-parser), and every metric it selects must be one the
services or the RabbitMQ exporter expose (KNOWN_METRICS), so a typo in a metric name fails CI
instead of producing an alert that can never fire or an empty panel.

Usage: promql_check.py DASHBOARD.json ...
"""

import json
import re
import sys

import promql_parser

# The metric names the services expose (histogram series included), plus what Prometheus
# and RabbitMQ's Prometheus plugin provide. A new metric in an alert or panel goes here too.
KNOWN_METRICS = {
    "ingress_requests_total",
    "ingress_refusals_total",
    "ingress_publish_seconds_bucket",
    "amqp_publish_confirm_seconds_bucket",
    "routing_events_total",
    "routing_assignment_seconds_bucket",
    "routing_waiting_conversations",
    "routing_slots_in_use",
    "routing_redis_repairs_total",
    "routing_redis_rebuilds_total",
    "routing_swept_assignments_total",
    "flow_callback_deliveries_total",
    "flow_callback_dead_lettered_total",
    "outbox_pending",
    "routing_employee_events_unnumbered",
    "amqp_consumer_dead_lettered_total",
    "rabbitmq_queue_messages_ready",
    "up",
}

# Grafana variables, replaced by plausible values before parsing.
GRAFANA_VARS = [
    ("$__rate_interval", "5m"),
    ("${queue_prefix}", ""),
    ("$namespace", ".*"),
]

SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")


def check_expr(expr: str, where: str) -> list:
    errors = []
    try:
        promql_parser.parse(expr)
    except ValueError as e:
        errors.append(f"{where}: PromQL does not parse ({e}): {expr}")
    for name in SELECTOR.findall(expr):
        if name not in KNOWN_METRICS:
            errors.append(f"{where}: unknown metric {name!r}")
    if not SELECTOR.search(expr):
        errors.append(f"{where}: selects no metric with a label matcher: {expr}")
    return errors


def check_dashboard(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        dashboard = json.load(f)
    errors = []
    panels = list(dashboard.get("panels", []))
    for p in list(panels):
        panels.extend(p.get("panels", []))
    n = 0
    for p in panels:
        for t in p.get("targets", []):
            expr = t.get("expr", "")
            for var, value in GRAFANA_VARS:
                expr = expr.replace(var, value)
            if "$" in expr:
                errors.append(f"{path}: panel {p.get('title')!r}: unknown variable in {expr}")
            errors += check_expr(expr, f"{path}: panel {p.get('title')!r}")
            n += 1
    if n == 0:
        errors.append(f"{path}: no queries")
    print(f"    {n} dashboard queries parse and use known metrics ({path.rsplit('/', 1)[-1]})")
    return errors


def main() -> int:
    errors = []
    for path in sys.argv[1:]:
        errors += check_dashboard(path)
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
