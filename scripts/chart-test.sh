#!/usr/bin/env bash
# Validates the Helm chart and the alert rules with the real tools:
# helm lint and template (default and full-featured values), the rendered
# manifests against Kubernetes schemas (offline), the alert rules with
# promtool, and the rendered config.toml with etcd-syncer's own parser.
# The live Prometheus test (dashboard and alert queries) is e2e/tests/prometheus.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
CHART=charts/etcd-syncer
HELM=.tools/bin/helm
VALIDATE=.tools/venv/bin/kubernetes-validate
PY=.tools/venv/bin/python
BIN=${ETCD_SYNCER_BIN:-target/debug/etcd-syncer}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "--- helm lint"
"$HELM" lint --strict "$CHART"
"$HELM" lint --strict "$CHART" -f "$CHART/ci/full-values.yaml"

echo "--- helm template + kubernetes-validate"
"$HELM" template release "$CHART" > "$out/default.yaml"
"$HELM" template release "$CHART" -f "$CHART/ci/full-values.yaml" > "$out/full.yaml"
grep -q 'kind: ServiceMonitor' "$out/full.yaml" && grep -q 'kind: PrometheusRule' "$out/full.yaml" \
  && grep -q 'kind: Job' "$out/full.yaml" || { echo "full values must render every optional resource" >&2; exit 1; }
# Strict: unknown fields fail. The CRD kinds (ServiceMonitor, PrometheusRule) have no offline schema and only warn.
"$VALIDATE" --strict --quiet "$out/default.yaml" "$out/full.yaml"

echo "--- promtool check rules"
promtool check rules "$CHART/files/alerts.yaml"

echo "--- rendered config.toml parses"
"$PY" - "$out" <<'PY'
import sys, yaml, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("default", "full"):
    for doc in yaml.safe_load_all((out / f"{name}.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap" and "config.toml" in doc.get("data", {}):
            (out / f"{name}.toml").write_text(doc["data"]["config.toml"])
PY
"$BIN" mirror-plus --config "$out/default.toml" --validate-config
# The full values mount TLS, password and auth-passwords Secrets: stand in for them.
root="$out/etc"
for side in source destination; do
  mkdir -p "$root/$side-tls" "$root/$side-auth"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=chart-test" \
    -keyout "$root/$side-tls/tls.key" -out "$root/$side-tls/tls.crt" 2>/dev/null
  cp "$root/$side-tls/tls.crt" "$root/$side-tls/ca.crt"
  echo secret > "$root/$side-auth/password"
done
mkdir -p "$root/auth-passwords"
echo 'app = "secret"' > "$root/auth-passwords/passwords.toml"
sed "s#/etc/etcd-syncer/#$root/#g" "$out/full.toml" > "$out/full-local.toml"
"$BIN" mirror-plus --config "$out/full-local.toml" --validate-config
echo "chart-test: all checks passed"
