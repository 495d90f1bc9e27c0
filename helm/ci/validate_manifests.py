#!/usr/bin/env python3
"""Split and check a `helm template` stream (used by deploy/check-chart.sh).

- Objects of built-in kinds go to <out>/native.yaml, which check-chart.sh then validates with
  `kubernetes-validate --strict`.
- Objects of the custom resource kinds in CRD_SCHEMAS are validated here against the JSON
  schemas in helm/ci/crd-schemas/ (JSON Schema 2020-12, formats checked).
- Any other kind fails: nothing is skipped silently.
- Every PrometheusRule expression must parse and select only known metrics (promql_check.py).
- Self-tests, so a permissive validator cannot pass by accident: a copy of each validated
  custom resource with an unknown field in its spec must fail its schema, and a copy of a
  Deployment with an unknown field must fail kubernetes-validate's strict schema.

Usage: validate_manifests.py RENDERED.yaml OUTDIR [--expect Kind=N ...] [--kube-version X.Y.Z]
  --expect Kind=N   fail unless the stream holds at least N objects of Kind
"""

import argparse
import collections
import copy
import json
import os
import sys

import jsonschema
import kubernetes_validate
import yaml

from promql_check import check_expr

HERE = os.path.dirname(os.path.abspath(__file__))

# Custom resources the chart can render, and the schema each must pass. apiVersion is part of
# the key, so a new version never slips past unvalidated.
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.json",
}

# Every other API group the chart may use must be a built-in one kubernetes-validate knows.
BUILTIN_GROUPS = {
    "v1",
    "apps/v1",
    "batch/v1",
    "policy/v1",
    "autoscaling/v2",
    "networking.k8s.io/v1",
}


def crd_validator(schema_file):
    with open(os.path.join(HERE, "crd-schemas", schema_file), encoding="utf-8") as f:
        schema = json.load(f)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def describe(doc):
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("rendered")
    parser.add_argument("outdir")
    parser.add_argument("--expect", action="append", default=[])
    parser.add_argument("--kube-version", default="1.30.0")
    args = parser.parse_args()

    with open(args.rendered, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]

    os.makedirs(args.outdir, exist_ok=True)
    native = []
    counts = collections.Counter()
    checked = collections.Counter()
    errors = []
    validators = {}
    for doc in docs:
        if not isinstance(doc, dict):
            errors.append(f"not an object: {doc!r:.80}")
            continue
        api, kind = doc.get("apiVersion"), doc.get("kind")
        counts[kind] += 1
        if (api, kind) in CRD_SCHEMAS:
            schema_file = CRD_SCHEMAS[(api, kind)]
            if schema_file not in validators:
                validators[schema_file] = crd_validator(schema_file)
            v = validators[schema_file]
            problems = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
            for e in problems:
                path = ".".join(str(p) for p in e.absolute_path) or "(root)"
                errors.append(f"{describe(doc)} against crd-schemas/{schema_file}: {path}: {e.message}")
            # Self-test: an unknown field must be refused.
            broken = copy.deepcopy(doc)
            broken["spec"]["bogusFieldForSelfTest"] = 1
            if v.is_valid(broken):
                errors.append(f"crd-schemas/{schema_file} accepts unknown spec fields")
            checked[schema_file] += 1
            if kind == "PrometheusRule":
                for group in doc["spec"].get("groups", []):
                    for rule in group.get("rules", []):
                        where = f"{describe(doc)} rule {rule.get('alert') or rule.get('record')}"
                        errors += check_expr(str(rule.get("expr", "")), where)
                        checked["PromQL expressions"] += 1
        elif api in BUILTIN_GROUPS:
            native.append(doc)
        else:
            errors.append(
                f"{describe(doc)} ({api}): no schema to validate it against; add one to "
                "helm/ci/crd-schemas and CRD_SCHEMAS in helm/ci/validate_manifests.py"
            )

    # Self-test of the strict built-in schemas (kubernetes-validate's own library).
    deployments = [d for d in native if d.get("kind") == "Deployment"]
    if deployments:
        broken = copy.deepcopy(deployments[0])
        broken["spec"]["template"]["spec"]["containers"][0]["bogusFieldForSelfTest"] = 1
        try:
            kubernetes_validate.validate(broken, args.kube_version, strict=True)
            errors.append("kubernetes-validate strict schemas accept unknown fields")
        except kubernetes_validate.ValidationError:
            pass

    for spec in args.expect:
        kind, _, n = spec.partition("=")
        if counts[kind] < int(n or 1):
            errors.append(f"expected at least {n} {kind} object(s), rendered {counts[kind]}")

    with open(os.path.join(args.outdir, "native.yaml"), "w", encoding="utf-8") as out:
        yaml.safe_dump_all(native, out, sort_keys=False)

    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"    {len(docs)} objects: {summary}")
    for what, n in sorted(checked.items()):
        if what.endswith(".json"):
            print(f"    {n} object(s) valid against crd-schemas/{what} (and an unknown field is refused)")
        else:
            print(f"    {n} {what} parse and use known metrics")
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
