#!/usr/bin/env bash
# Validates the Helm chart and the alert rules with the real tools:
# helm lint and template (default and full-featured values), values.schema.json
# (a misspelled key must fail), the rendered manifests against Kubernetes
# schemas (offline), the NetworkPolicy, the helm test hook and the
# PrometheusRule (runbook_url, disabledAlerts) as rendered, the alert rules
# with promtool (check and unit tests), and the rendered config.toml with
# etcd-syncer's own parser.
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

echo "--- values.schema.json: typos fail, every value is described"
# must_fail <what> <command...>: the command must fail and name the bad key.
must_fail() {
  local what=$1; shift
  if "$@" > "$out/fail.log" 2>&1; then
    echo "expected to fail ($what): $*" >&2; exit 1
  fi
  grep -q "$what" "$out/fail.log" || { echo "failed, but not about $what:" >&2; cat "$out/fail.log" >&2; exit 1; }
}
printf 'replicaCont: 2\n' > "$out/typo-top.yaml"
printf 'source:\n  tls:\n    existingSecrt: x\n' > "$out/typo-nested.yaml"
printf 'networkPolicy:\n  egress:\n    etcdPort: [2379]\n' > "$out/typo-np.yaml"
for typo in top nested np; do
  key=$(grep -o '[A-Za-z]*:' "$out/typo-$typo.yaml" | tail -1 | tr -d :)
  must_fail "$key" "$HELM" lint --strict "$CHART" -f "$out/typo-$typo.yaml"
  must_fail "$key" "$HELM" template release "$CHART" -f "$out/typo-$typo.yaml"
  must_fail "$key" "$HELM" template release "$CHART" -f "$CHART/ci/full-values.yaml" -f "$out/typo-$typo.yaml"
done
must_fail replicaCount "$HELM" template release "$CHART" --set replicaCount=two
must_fail "no alert named EtcdSyncerLagHgh" "$HELM" template release "$CHART" \
  --set prometheusRule.enabled=true --set 'prometheusRule.disabledAlerts={EtcdSyncerLagHgh}'
"$PY" - "$CHART" <<'PY'
import json, sys
schema = json.load(open(f"{sys.argv[1]}/values.schema.json"))
def walk(node, path):
    if node.get("type") == "object" and "properties" in node:
        assert node.get("additionalProperties") is False, f"{path}: additionalProperties must be false"
    for key, child in node.get("properties", {}).items():
        assert child.get("description"), f"{path}.{key}: no description"
        walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        walk(node["items"], f"{path}[]")
walk(schema, "values")
PY

echo "--- helm template + kubernetes-validate"
"$HELM" template release "$CHART" > "$out/default.yaml"
"$HELM" template release "$CHART" -f "$CHART/ci/full-values.yaml" > "$out/full.yaml"
# The NetworkPolicy on default values: etcd ports from the endpoints, or etcdPorts.
"$HELM" template release "$CHART" --set networkPolicy.enabled=true \
  --set 'source.endpoints={http://a:12379,http://b:12379}' --set 'destination.endpoints={http://[fd00::1]:2379}' \
  --show-only templates/networkpolicy.yaml > "$out/np-derived.yaml"
"$HELM" template release "$CHART" --set networkPolicy.enabled=true --set 'networkPolicy.egress.etcdPorts={2379,32379}' \
  --set networkPolicy.egress.dns=false --show-only templates/networkpolicy.yaml > "$out/np-ports.yaml"
must_fail "has no port" "$HELM" template release "$CHART" --set networkPolicy.enabled=true --set 'source.endpoints={http://a}'
# Config reload: live (default) keeps pods on a config change; restart rolls them.
"$HELM" template release "$CHART" --show-only templates/deployment.yaml | grep -q "checksum/config" && { echo "configReload=live must not roll pods on a config change" >&2; exit 1; }
"$HELM" template release "$CHART" --set configReload=restart --show-only templates/deployment.yaml | grep -q "checksum/config" || { echo "configReload=restart must roll pods" >&2; exit 1; }
must_fail "configReload" "$HELM" template release "$CHART" --set configReload=sometimes
# Endpoint groups: a misspelled field fails; their ports feed the NetworkPolicy.
must_fail "nmae" "$HELM" template release "$CHART" --set 'destination.endpointGroups[0].nmae=x'
"$HELM" template release "$CHART" --set networkPolicy.enabled=true \
  --set 'destination.endpointGroups[0].name=line' --set 'destination.endpointGroups[0].endpoints={http://10.0.0.1:22379}' \
  --show-only templates/networkpolicy.yaml | grep -q "port: 22379" || { echo "endpoint group ports must reach the NetworkPolicy" >&2; exit 1; }
"$HELM" template release "$CHART" --set prometheusRule.enabled=true \
  --set 'prometheusRule.disabledAlerts={EtcdSyncerRepeatedSlowPaths,EtcdSyncerLagHigh}' \
  --show-only templates/prometheusrule.yaml > "$out/rules-disabled.yaml"
for kind in ServiceMonitor PrometheusRule Job NetworkPolicy Pod; do
  grep -q "^kind: $kind\$" "$out/full.yaml" || { echo "full values must render every optional resource ($kind)" >&2; exit 1; }
done
# zk2etcd: its own Deployment and Service when enabled; servers and prefixes required.
must_fail "zk2etcd.servers is required" "$HELM" template release "$CHART" --set zk2etcd.enabled=true
must_fail "zk2etcd.prefixes is required" "$HELM" template release "$CHART" --set zk2etcd.enabled=true --set zk2etcd.servers=zk:2181
must_fail "ephemeral" "$HELM" template release "$CHART" --set zk2etcd.ephemeral=sometimes
"$HELM" template release "$CHART" -f "$CHART/ci/full-values.yaml" --set zk2etcd.enabled=true \
  --set 'zk2etcd.servers=zk1:2181\,zk2:2181' --set 'zk2etcd.prefixes={/dubbo,/services}' \
  --set 'zk2etcd.excludePrefixes={/dubbo/internal}' --set zk2etcd.digest.existingSecret=zk-digest \
  --set zk2etcd.tls.existingSecret=zk-tls --set zk2etcd.tls.clientCertificate=true > "$out/zk2etcd.yaml"
# Strict: unknown fields fail. The CRD kinds (ServiceMonitor, PrometheusRule) have no offline schema and only warn.
"$VALIDATE" --strict --quiet "$out/default.yaml" "$out/full.yaml" "$out/np-derived.yaml" "$out/np-ports.yaml" "$out/zk2etcd.yaml"
"$PY" - "$out" "$BIN" <<'PY'
import sys, pathlib, subprocess, yaml
out, binary = pathlib.Path(sys.argv[1]), sys.argv[2]
docs = [d for d in yaml.safe_load_all((out / "zk2etcd.yaml").read_text()) if d]
deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
assert set(deployments) == {"release-etcd-syncer", "release-etcd-syncer-zk2etcd"}, set(deployments)
mirror, zk = deployments["release-etcd-syncer"], deployments["release-etcd-syncer-zk2etcd"]
zk_labels = zk["spec"]["template"]["metadata"]["labels"]
# The mirror's Deployment never selects zk2etcd's pods, nor the other way round.
assert not mirror["spec"]["selector"]["matchLabels"].items() <= zk_labels.items()
assert not zk["spec"]["selector"]["matchLabels"].items() <= mirror["spec"]["template"]["metadata"]["labels"].items()
[service] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-zk2etcd")]
assert service["spec"]["selector"].items() <= zk_labels.items()
[monitor] = [d for d in docs if d["kind"] == "ServiceMonitor"]
assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(), "the ServiceMonitor scrapes zk2etcd"
pod = zk["spec"]["template"]["spec"]
[container] = pod["containers"]
args = container["args"]
for want in ("zk2etcd", "--zk-cacert=/etc/etcd-syncer/zookeeper-tls/ca.crt", "--zk-key=/etc/etcd-syncer/zookeeper-tls/tls.key", "--zk-servers=zk1:2181,zk2:2181", "--zk-prefix=/dubbo", "--zk-prefix=/services", "--exclude-prefix=/dubbo/internal"):
    assert want in args, (want, args)
assert {"name": "ETCD_SYNCER_ZK_DIGEST", "valueFrom": {"secretKeyRef": {"name": "zk-digest", "key": "digest"}}} in container["env"]
# Every flag as etcd-syncer parses it (clap rejects an unknown flag or a bad value before --help).
parsed = subprocess.run([binary, *args, "--help"], capture_output=True, text=True)
assert parsed.returncode == 0, parsed.stderr
for arg in args:
    for flag in ("--dst-cacert", "--dst-cert", "--dst-key", "--zk-cacert", "--zk-cert", "--zk-key"):
        if arg.startswith(flag + "="):
            path = arg.split("=", 1)[1]
            assert any(path.startswith(m["mountPath"]) for m in container["volumeMounts"]), (arg, container["volumeMounts"])
print("zk2etcd: Deployment, Service and flags as etcd-syncer parses them")
PY

echo "--- rendered NetworkPolicy, helm test, ServiceAccount token, PrometheusRule"
"$PY" - "$out" "$CHART" <<'PY'
import sys, pathlib, re, yaml
out, chart = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def docs(name):
    return [d for d in yaml.safe_load_all((out / f"{name}.yaml").read_text()) if d]
def one(name, kind):
    found = [d for d in docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: {len(found)} {kind}"
    return found[0]
def egress_ports(policy):
    return [sorted((p["protocol"], p["port"]) for p in rule["ports"]) for rule in policy["spec"]["egress"]]

# NetworkPolicy: off by default; ingress to the metrics port only; egress to etcd and DNS.
assert not [d for d in docs("default") if d["kind"] == "NetworkPolicy"], "NetworkPolicy must be off by default"
deployment = one("full", "Deployment")
pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
policy = one("full", "NetworkPolicy")
spec = policy["spec"]
assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
assert spec["policyTypes"] == ["Ingress", "Egress"]
[ingress] = spec["ingress"]
assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
assert "metrics" in [p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]]
assert ingress["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}], ingress
assert egress_ports(policy) == [[("TCP", 2379)], [("TCP", 53), ("UDP", 53)]], egress_ports(policy)
assert spec["egress"][0]["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}] and "to" not in spec["egress"][1]
derived = one("np-derived", "NetworkPolicy")
assert derived["spec"]["ingress"][0]["from"] == [{"podSelector": {}}], "default ingress: every pod of the namespace"
assert egress_ports(derived) == [[("TCP", 2379), ("TCP", 12379)], [("TCP", 53), ("UDP", 53)]], egress_ports(derived)
assert "to" not in derived["spec"]["egress"][0]
assert egress_ports(one("np-ports", "NetworkPolicy")) == [[("TCP", 2379), ("TCP", 32379)]]

# helm test: a hook Pod running `status` against the destination with the Deployment's mounts.
for name in ("default", "full"):
    deploy = one(name, "Deployment")["spec"]["template"]["spec"]
    test = one(name, "Pod")
    assert test["metadata"]["annotations"]["helm.sh/hook"] == "test", test["metadata"]
    pod = test["spec"]
    [container] = pod["containers"]
    args = container["args"]
    assert args[0] == "status", args
    values = yaml.safe_load((chart / ("ci/full-values.yaml" if name == "full" else "values.yaml")).read_text())["destination"]
    if values.get("endpointGroups"):
        want = [f"--dst-endpoint-group={g['name']}={','.join(g['endpoints'])}" for g in values["endpointGroups"]]
        assert [a for a in args if a.startswith("--dst-endpoint")] == want, args
    else:
        assert f"--dst-endpoints={','.join(values['endpoints'])}" in args, args
    assert pod["restartPolicy"] == "Never"
    assert pod["volumes"] == deploy["volumes"], (pod["volumes"], deploy["volumes"])
    assert container["volumeMounts"] == deploy["containers"][0]["volumeMounts"]
    for flag in ("--dst-cacert", "--dst-cert", "--dst-key"):
        for arg in args:
            if arg.startswith(flag + "="):
                path = arg.split("=", 1)[1]
                assert any(path.startswith(m["mountPath"] + "/") for m in container["volumeMounts"]), arg
    if name == "full":
        assert "--dst-user=syncer" in args and "--dst-cacert=/etc/etcd-syncer/destination-tls/ca.crt" in args, args
        [env] = container["env"]
        assert env["name"] == "ETCD_SYNCER_DST_PASSWORD" and env["valueFrom"]["secretKeyRef"]["name"] == "etcd-standby-syncer-password"

# The syncer never talks to the Kubernetes API: no token anywhere.
for name in ("default", "full"):
    for doc in docs(name):
        if doc["kind"] == "ServiceAccount":
            assert doc["automountServiceAccountToken"] is False
        pod = {"Deployment": lambda d: d["spec"]["template"]["spec"], "Job": lambda d: d["spec"]["template"]["spec"],
               "Pod": lambda d: d["spec"]}.get(doc["kind"])
        if pod:
            assert pod(doc)["automountServiceAccountToken"] is False, f"{name}: {doc['kind']} mounts a token"

# PrometheusRule: files/alerts.yaml plus runbook_url, less disabledAlerts.
source = yaml.safe_load((chart / "files/alerts.yaml").read_text())
base = "https://git.example.com/platform/etcd-syncer/blob/v0.1.0/docs/operations.md"
rendered = one("full", "PrometheusRule")["spec"]
(out / "rendered-rules.yaml").write_text(yaml.safe_dump(rendered))
names = []
for want_group, got_group in zip(source["groups"], rendered["groups"], strict=True):
    for want, got in zip(want_group["rules"], got_group["rules"], strict=True):
        url = got["annotations"].pop("runbook_url")
        anchor = want["annotations"]["runbook"].split("#", 1)[1]
        assert url == f"{base}#{anchor}", url
        assert got == want, (got, want)
        names.append(want["alert"])
disabled = one("rules-disabled", "PrometheusRule")["spec"]
kept = [r["alert"] for g in disabled["groups"] for r in g["rules"]]
assert kept == [n for n in names if n not in ("EtcdSyncerRepeatedSlowPaths", "EtcdSyncerLagHigh")], kept
default_url = yaml.safe_load((chart / "values.yaml").read_text())["prometheusRule"]["runbookBaseUrl"]
assert all(r["annotations"]["runbook_url"].startswith(default_url + "#") for g in disabled["groups"] for r in g["rules"])

# The replicator gone altogether: NoLeader also covers the vanished series.
no_leader = next(r for g in source["groups"] for r in g["rules"] if r["alert"] == "EtcdSyncerNoLeader")
assert "absent(etcd_syncer_is_leader)" in no_leader["expr"]

# Every runbook anchor exists in docs/operations.md (an <a id> or a heading).
ops = (chart / "../../docs/operations.md").read_text()
anchors = set(re.findall(r'<a id="([^"]+)"', ops))
for heading in re.findall(r"^#+\s+(.*)$", ops, re.M):
    anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower())))
missing = sorted({r["annotations"]["runbook"].split("#", 1)[1] for g in source["groups"] for r in g["rules"]} - anchors)
assert not missing, f"runbook anchors missing from docs/operations.md: {missing}"
PY

echo "--- promtool check rules + test rules"
promtool check rules "$CHART/files/alerts.yaml" "$out/rendered-rules.yaml"
promtool test rules "$CHART/ci/alerts.test.yaml"

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
# revisionExact renders the flag and no [[jobs]], and the result validates.
"$HELM" template release "$CHART" --set revisionExact=true --show-only templates/configmap.yaml \
  | "$PY" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["data"]["config.toml"])' > "$out/exact.toml"
grep -q '^revision-exact = true$' "$out/exact.toml" || { echo "revisionExact must render revision-exact = true" >&2; exit 1; }
grep -q '^\[\[jobs\]\]' "$out/exact.toml" && { echo "revisionExact must not render [[jobs]]" >&2; exit 1; }
grep -q '^exact-gap = "catch-up"$' "$out/exact.toml" || { echo "revisionExact must render exact-gap" >&2; exit 1; }
"$BIN" mirror-plus --config "$out/exact.toml" --validate-config
"$HELM" template release "$CHART" --set revisionExact=true --set exactGap=later >/dev/null 2>&1 \
  && { echo "the schema must refuse exactGap=later" >&2; exit 1; }
grep -q '^\[\[destination.endpoint-groups\]\]$' "$out/full.toml" || { echo "full values must render endpoint groups" >&2; exit 1; }
echo "chart-test: all checks passed"
