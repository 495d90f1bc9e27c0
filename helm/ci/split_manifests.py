#!/usr/bin/env python3
"""Split a `helm template` stream for validation.

Objects of built-in kinds go to <out>/native.yaml (for kubernetes-validate --strict). Objects
of the custom resource kinds we know (see CRD_SCHEMAS) go to <out>/crd/<Kind>-<n>.json, one per
object, and the schema each must pass is listed in <out>/crd/plan.tsv. A kind that is neither
built in nor known here makes the script fail: nothing is skipped silently.

Usage: split_manifests.py RENDERED.yaml OUTDIR [--expect Kind=N ...]
  --expect Kind=N   fail unless the stream holds at least N objects of Kind
"""

import argparse
import collections
import json
import os
import sys

import yaml

# Custom resources the chart can render, and the JSON schema (in helm/ci/crd-schemas/) each
# must pass. apiVersion is checked here too, so a new version never slips past unvalidated.
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("rendered")
    parser.add_argument("outdir")
    parser.add_argument("--expect", action="append", default=[])
    args = parser.parse_args()

    with open(args.rendered, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]

    os.makedirs(os.path.join(args.outdir, "crd"), exist_ok=True)
    native = []
    plan = []
    counts = collections.Counter()
    errors = []
    for doc in docs:
        if not isinstance(doc, dict):
            errors.append(f"not an object: {doc!r:.80}")
            continue
        api, kind = doc.get("apiVersion"), doc.get("kind")
        name = (doc.get("metadata") or {}).get("name", "?")
        counts[kind] += 1
        if (api, kind) in CRD_SCHEMAS:
            path = os.path.join(args.outdir, "crd", f"{kind}-{counts[kind]}.json")
            with open(path, "w", encoding="utf-8") as out:
                json.dump(doc, out, indent=1)
            plan.append((CRD_SCHEMAS[(api, kind)], path))
        elif api in BUILTIN_GROUPS:
            native.append(doc)
        else:
            errors.append(
                f"{kind}/{name} ({api}): no schema to validate it against; add one to "
                "helm/ci/crd-schemas and CRD_SCHEMAS in helm/ci/split_manifests.py"
            )

    for spec in args.expect:
        kind, _, n = spec.partition("=")
        if counts[kind] < int(n or 1):
            errors.append(f"expected at least {n} {kind} object(s), rendered {counts[kind]}")

    with open(os.path.join(args.outdir, "native.yaml"), "w", encoding="utf-8") as out:
        yaml.safe_dump_all(native, out, sort_keys=False)
    with open(os.path.join(args.outdir, "crd", "plan.tsv"), "w", encoding="utf-8") as out:
        for schema, path in plan:
            out.write(f"{schema}\t{path}\n")

    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"    {len(docs)} objects: {summary}")
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
