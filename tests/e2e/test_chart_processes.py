"""The chart's Deployments, started as local processes (DESIGN.md "Running it").

``helm template`` renders the chart with its default values; each Deployment's container is then
run the way the kubelet would run it: the rendered command (``/opt/venv/bin/python`` is this
venv's python), a clean environment holding only the rendered ``env`` (``secretKeyRef`` read from
the rendered Secrets, ``$(VAR)`` expanded with the Kubernetes rules), and the rendered probes
performed against the ops port. Only what must point at this machine is changed: the Redis and
NATS addresses (to servers this module starts with the chart's generated passwords), the host
part of the ``dns:///`` gRPC targets, the mount paths of Secret volumes (the rendered TLS Secret
is written to disk), the listen addresses (loopback) and, if the machine already uses one of the
chart's fixed ports, that port (consistently in the env, the probes and the peers' targets).
So a command that does not start, an env var the code misreads, or a probe path or port the
code does not serve fails here, with the process's log.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rempart.common.testing.localstack import free_port, nats_binary, redis_binary, wait_for_port

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "rempart"
HELM = REPO / ".tools" / "bin" / "helm"
RELEASE, NAMESPACE = "rempart", "mail"
CONTAINER_PYTHON = "/opt/venv/bin/python"
COMPONENTS = ("policy", "auth", "smtp-edge", "imap-pop", "admin-api", "relay")
# The outbound relay is off in the default values; the harness turns it on to prove its command.
RENDER_ARGS = ("--set", "components.relay.enabled=true")
MODULES = {c: "rempart." + c.replace("-", "_") for c in COMPONENTS} | {"relay": "rempart.smtp_edge.relay"}
# Kubernetes leaves the bind address to the process; on this machine every listener is loopback.
LISTEN_HOST_VARS = ("REMPART_LISTEN_HOST", "REMPART_OPS_HOST", "REMPART_GRPC_HOST", "REMPART_HTTP_HOST")
STARTUP_DEADLINE = 45.0


# Rendering -------------------------------------------------------------------------------------
def helm() -> str:
    if not os.access(HELM, os.X_OK):
        fetched = subprocess.run([sys.executable, str(REPO / "tools" / "fetch_helm.py")],
                                 capture_output=True, text=True, timeout=300, check=False)
        assert fetched.returncode == 0, f"tools/fetch_helm.py failed:\n{fetched.stderr}"
    return str(HELM)


def render(*args: str) -> list[dict[str, Any]]:
    result = subprocess.run([helm(), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return [o for o in yaml.safe_load_all(result.stdout) if o]


def component_of(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"]["app.kubernetes.io/component"])


# The kubelet's part ----------------------------------------------------------------------------
_REFERENCE = re.compile(r"\$(\$|\(([^)]*)\))")


def expand(value: str, defined: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: a variable defined earlier in the list is replaced, an
    undefined one is left as written, ``$$`` is an escaped ``$`` (k8s.io/kubernetes
    third_party/forked/golang/expansion)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        name = match.group(2)
        return defined.get(name, match.group(0))

    return _REFERENCE.sub(substitute, value)


def secret_value(objects: list[dict[str, Any]], name: str, key: str) -> str:
    for obj in objects:
        if obj["kind"] == "Secret" and obj["metadata"]["name"] == name:
            data = obj.get("data") or {}
            if key in data:
                return base64.b64decode(data[key]).decode()
            string_data = obj.get("stringData") or {}
            if key in string_data:
                return str(string_data[key])
            raise AssertionError(f"Secret {name} has no key {key!r}")
    raise AssertionError(f"no rendered Secret named {name} (a pod referencing it would not start)")


def container_env(objects: list[dict[str, Any]], container: dict[str, Any], pod_name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" in item:
            source = item["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[name] = secret_value(objects, ref["name"], ref["key"])
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[name] = {"metadata.name": pod_name, "metadata.namespace": NAMESPACE,
                             "status.podIP": "127.0.0.1"}[path]
            else:
                raise AssertionError(f"{pod_name}: env {name}: unsupported valueFrom {source}")
        else:
            env[name] = expand(str(item.get("value", "")), env)
    return env


def bind_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def with_host_port(url: str, host: str, port: int) -> str:
    """The URL with only host and port replaced: scheme, credentials, path kept."""
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"{host}:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Pod:
    component: str
    deployment: dict[str, Any]
    container: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    # Container port name -> (the chart's number, the number used on this machine).
    ports: dict[str, tuple[int, int]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    # Tells the pods of one Deployment apart (a rolling update runs two at once).
    ordinal: int = 0

    @property
    def name(self) -> str:
        return f"{self.deployment['metadata']['name']}-{self.ordinal}"

    @property
    def grace(self) -> int:
        return int(self.deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30))

    def port(self, ref: int | str) -> int:
        for chart_port, local_port in self.ports.values():
            if ref == chart_port:
                return local_port
        if isinstance(ref, str) and ref in self.ports:
            return self.ports[ref][1]
        raise AssertionError(f"{self.name}: probe port {ref!r} is not a container port of the pod")

    def log(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def probe_once(pod: Pod, probe: dict[str, Any]) -> tuple[bool, str]:
    timeout = float(probe.get("timeoutSeconds", 1))
    if "httpGet" in probe:
        get = probe["httpGet"]
        port = pod.port(get["port"])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", get.get("path", "/"))
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
            # The kubelet's rule: 200 <= status < 400 is a success.
            return 200 <= resp.status < 400, f"GET :{port}{get.get('path', '/')} -> {resp.status} {body.strip()}"
        except OSError as exc:
            return False, f"GET :{port}{get.get('path', '/')} -> {exc}"
        finally:
            conn.close()
    if "grpc" in probe:
        port = pod.port(probe["grpc"]["port"])
        service = probe["grpc"].get("service", "")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            except grpc.RpcError as exc:
                return False, f"grpc health :{port} {service!r} -> {exc.code()}"
        return reply.status == health_pb2.HealthCheckResponse.SERVING, f"grpc health :{port} -> {reply.status}"
    if "tcpSocket" in probe:
        port = pod.port(probe["tcpSocket"]["port"])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout):
                return True, f"tcp :{port} open"
        except OSError as exc:
            return False, f"tcp :{port} -> {exc}"
    raise AssertionError(f"{pod.name}: probe kind not emulated here: {sorted(probe)}")


def probe_until(pod: Pod, kind: str, probe: dict[str, Any], deadline: float) -> str:
    """Polls like the kubelet (every periodSeconds, capped at 1 s here) until success or the
    deadline; fails with the last answer and the process's log."""
    period = min(float(probe.get("periodSeconds", 10)), 1.0)
    last = ""
    while True:
        assert pod.proc is not None
        if pod.proc.poll() is not None:
            raise AssertionError(f"{pod.name} exited with {pod.proc.returncode} before its {kind} passed:\n"
                                 + pod.log())
        ok, last = probe_once(pod, probe)
        if ok:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{pod.name}: {kind} still failing: {last}\n{pod.log()}")
        time.sleep(period)


# Redis and NATS with the chart's credentials --------------------------------------------------
@dataclass
class Backing:
    redis_port: int
    nats_port: int
    procs: list[subprocess.Popen[bytes]]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def start_backing(workdir: Path, redis_url: str, nats_url: str) -> Backing:
    redis_password = urllib.parse.urlsplit(redis_url).password or ""
    nats = urllib.parse.urlsplit(nats_url)
    redis_port, nats_port = free_port(), free_port()
    (workdir / "redis").mkdir()
    args = [redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(workdir / "redis"), "--logfile", str(workdir / "redis" / "redis.log")]
    if redis_password:
        args += ["--requirepass", redis_password]
    procs = [subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    conf = workdir / "nats.conf"
    auth = ""
    if nats.username:
        auth = f'authorization {{\n  user: "{nats.username}"\n  password: "{nats.password or ""}"\n}}\n'
    conf.write_text(f"listen: 127.0.0.1:{nats_port}\njetstream {{\n  store_dir: \"{workdir / 'js'}\"\n"
                    f"  sync_interval: always\n}}\n{auth}")
    procs.append(subprocess.Popen([nats_binary(), "-c", str(conf), "-l", str(workdir / "nats.log")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    backing = Backing(redis_port, nats_port, procs)
    try:
        wait_for_port("127.0.0.1", redis_port, proc=procs[0])
        wait_for_port("127.0.0.1", nats_port, proc=procs[1])
    except Exception:
        backing.stop()
        raise
    return backing


# The pods --------------------------------------------------------------------------------------
def plan_pods(objects: list[dict[str, Any]], workdir: Path, backing: Backing, move_all_ports: bool,
              ordinal: int = 0) -> dict[str, Pod]:
    """The pods as this machine runs them. ``move_all_ports`` moves every port off the chart's
    number: the code's defaults equal the chart's ports, so only then does a port variable the
    code does not read show up (the process would listen on its default, not where the probe looks)."""
    deployments = {component_of(o): o for o in objects if o["kind"] == "Deployment"}
    missing = set(COMPONENTS) - deployments.keys()
    assert not missing, f"the default values render no Deployment for {sorted(missing)}"
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    pods: dict[str, Pod] = {}
    taken: set[int] = set()
    for component, deployment in deployments.items():
        pod_spec = deployment["spec"]["template"]["spec"]
        assert len(pod_spec["containers"]) == 1, f"{component}: one container expected"
        container = pod_spec["containers"][0]
        pod = Pod(component, deployment, container, ordinal=ordinal)
        for port in container.get("ports") or []:
            number = int(port["containerPort"])
            # A fixed port already in use here is remapped, consistently everywhere it appears.
            keep = not move_all_ports and number not in taken and bind_free(number)
            local = number if keep else free_port()
            taken.add(local)
            pod.ports[port["name"]] = (number, local)
        pod.env = container_env(objects, container, pod.name)
        pods[component] = pod

    def pod_behind(service_name: str) -> Pod:
        service = services.get(service_name)
        assert service is not None, f"gRPC target names no rendered Service: {service_name}"
        selected = service["spec"]["selector"]["app.kubernetes.io/component"]
        return pods[selected]

    for pod in pods.values():
        env = pod.env
        for chart_port, local_port in pod.ports.values():
            for name, value in env.items():
                if name.endswith("_PORT") and value == str(chart_port):
                    env[name] = str(local_port)
        for name, value in list(env.items()):
            target = re.fullmatch(r"dns:///([a-z0-9-]+)\.[a-z0-9.-]+:(\d+)", value)
            if name.endswith("_TARGET") and target:
                peer = pod_behind(target.group(1))
                env[name] = f"dns:///127.0.0.1:{peer.port(int(target.group(2)))}"
        env["REMPART_REDIS_URL"] = with_host_port(env["REMPART_REDIS_URL"], "127.0.0.1", backing.redis_port)
        env["REMPART_NATS_URL"] = with_host_port(env["REMPART_NATS_URL"], "127.0.0.1", backing.nats_port)
        for var in LISTEN_HOST_VARS:
            env[var] = "127.0.0.1"
        # Secret volumes: the rendered Secret's keys become files, mounted where the chart says.
        pod_spec = pod.deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        root = workdir / pod.name
        for mount in pod.container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            if "secret" not in volume:
                continue
            secret_name = volume["secret"]["secretName"]
            target_dir = root / mount["mountPath"].lstrip("/")
            target_dir.mkdir(parents=True)
            secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == secret_name)
            for key in secret.get("data") or {}:
                (target_dir / key).write_text(secret_value(objects, secret_name, key))
                (target_dir / key).chmod(volume["secret"].get("defaultMode", 0o644))
            for name, value in env.items():
                if value.startswith(mount["mountPath"].rstrip("/") + "/"):
                    env[name] = str(target_dir) + value[len(mount["mountPath"].rstrip("/")):]
    return pods


def start_pod(pod: Pod, workdir: Path) -> None:
    command = pod.container.get("command") or []
    assert command[:1] == [CONTAINER_PYTHON], f"{pod.name}: command {command} is not the image's python"
    argv = [sys.executable, *command[1:], *(pod.container.get("args") or [])]
    # The container's environment: the image's ENV (the root Dockerfile, HOME of its user) and
    # what the chart renders; nothing is inherited from this shell.
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
           "HOME": str(workdir / "nonexistent"), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
           **pod.env}
    if "PYTHONPATH" in os.environ:
        # Where this interpreter finds the code (a checkout under test), as the image's venv would.
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    pod.log_path = workdir / f"{pod.name}.log"
    with open(pod.log_path, "ab") as log:
        pod.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                    start_new_session=True)


def stop_pod(pod: Pod) -> None:
    if pod.proc is not None and pod.proc.poll() is None:
        os.killpg(pod.proc.pid, signal.SIGKILL)
        pod.proc.wait()


@dataclass
class Release:
    objects: list[dict[str, Any]]
    pods: dict[str, Pod]
    startup: dict[str, str]


@pytest.fixture(scope="module", params=["chart-ports", "all-ports-moved"])
def release(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    workdir = tmp_path_factory.mktemp("chart-pods")
    objects = render(*RENDER_ARGS)
    # Every component shares the rendered credentials: the backing servers require exactly those.
    policy = next(o for o in objects if o["kind"] == "Deployment" and component_of(o) == "policy")
    probe_env = container_env(objects, policy["spec"]["template"]["spec"]["containers"][0], "credentials")
    backing = start_backing(workdir, probe_env["REMPART_REDIS_URL"], probe_env["REMPART_NATS_URL"])
    pods: dict[str, Pod] = {}
    try:
        for attempt in (1, 2):
            attempt_dir = workdir / f"attempt-{attempt}"
            attempt_dir.mkdir()
            pods = plan_pods(objects, attempt_dir, backing, move_all_ports=request.param == "all-ports-moved")
            try:
                startup = start_and_wait(pods, attempt_dir)
                break
            except AssertionError:
                # A free port is picked here and bound later by the process: on a shared machine
                # another process can take it in between. That, and only that, is retried once.
                if attempt == 2 or not any("address already in use" in p.log(400) for p in pods.values()):
                    raise
                for pod in pods.values():
                    stop_pod(pod)
        yield Release(objects, pods, startup)
    finally:
        for pod in pods.values():
            stop_pod(pod)
        backing.stop()


def start_and_wait(pods: dict[str, Pod], workdir: Path) -> dict[str, str]:
    """Starts every pod, then waits for each startupProbe (the kubelet holds the other probes
    until it passes); the successful answers."""
    for component in COMPONENTS:
        start_pod(pods[component], workdir)
    deadline = time.monotonic() + STARTUP_DEADLINE
    return {component: probe_until(pods[component], "startupProbe", pods[component].container["startupProbe"],
                                   deadline) for component in COMPONENTS}


# The tests -------------------------------------------------------------------------------------
def test_kubernetes_env_expansion_rules() -> None:
    defined = {"A": "x", "PASSWORD": "p@ss"}
    assert expand("redis://:$(PASSWORD)@h:6379/0", defined) == "redis://:p@ss@h:6379/0"
    assert expand("$(UNDEFINED)-$(A)", defined) == "$(UNDEFINED)-x"
    assert expand("$$(A) $$ $(A", defined) == "$(A) $ $(A"


def test_chart_pods_start_from_rendered_command_and_env(release: Release) -> None:
    for component in COMPONENTS:
        pod = release.pods[component]
        assert pod.container["command"] == [CONTAINER_PYTHON, "-m", MODULES[component]]
        assert pod.env["REMPART_ENVIRONMENT"] == "prod"
        assert release.startup[component].endswith("200 ok"), release.startup[component]
        # The secret key came from the rendered Secret through secretKeyRef, never inline.
        assert len(base64.urlsafe_b64decode(pod.env["REMPART_SECRET_KEY"])) == 32
        # $(REDIS_PASSWORD) and $(NATS_PASSWORD) were expanded into the URLs the code connected with.
        assert "$(" not in pod.env["REMPART_REDIS_URL"] + pod.env["REMPART_NATS_URL"]
        assert urllib.parse.urlsplit(pod.env["REMPART_REDIS_URL"]).password == pod.env["REDIS_PASSWORD"]


def test_r_ops_4_rendered_probes_and_scrape_endpoint_answer(release: Release) -> None:
    deadline = time.monotonic() + 20
    for component in COMPONENTS:
        pod = release.pods[component]
        for kind in ("livenessProbe", "readinessProbe"):
            probe_until(pod, kind, pod.container[kind], deadline)
        # Prometheus scrapes what the pod annotations say (metrics.scrapeAnnotations).
        annotations = pod.deployment["spec"]["template"]["metadata"].get("annotations") or {}
        assert annotations.get("prometheus.io/scrape") == "true"
        scrape = {"httpGet": {"path": annotations["prometheus.io/path"],
                              "port": int(annotations["prometheus.io/port"])}, "timeoutSeconds": 3}
        ok, answer = probe_once(pod, scrape)
        assert ok, f"{pod.name}: {answer}\n{pod.log()}"
        assert "# TYPE " in answer, answer[:300]


# What each mail port says first; "tls" ports are implicit TLS (RFC 8314).
GREETINGS = {"smtp": ("plain", "220 "), "submission": ("plain", "220 "), "smtps": ("tls", "220 "),
             "imap": ("plain", "* OK"), "imaps": ("tls", "* OK"), "pop3": ("plain", "+OK"),
             "pop3s": ("tls", "+OK")}


def first_line(pod: Pod, port_name: str) -> str:
    mode, _ = GREETINGS[port_name]
    with socket.create_connection(("127.0.0.1", pod.port(port_name)), timeout=10) as raw:
        if mode == "plain":
            return raw.makefile("rb").readline().decode(errors="replace")
        # The certificate the chart generated (Secret rempart-tls), checked against the mail host name.
        ctx = ssl.create_default_context(cafile=pod.env["REMPART_TLS_CERT_FILE"])
        with ctx.wrap_socket(raw, server_hostname=pod.env["REMPART_HOSTNAME"]) as tls:
            return tls.makefile("rb").readline().decode(errors="replace")


def test_chart_ports_are_the_ports_the_code_serves(release: Release) -> None:
    """Every container port (the Services' targetPorts) answers: mail ports greet in their
    protocol (over TLS with the chart's certificate where implicit), the others accept TCP."""
    for component in COMPONENTS:
        pod = release.pods[component]
        for name, (chart_port, local_port) in pod.ports.items():
            where = f"{pod.name}: container port {name} ({chart_port}, here {local_port})"
            try:
                if name in GREETINGS:
                    line = first_line(pod, name)
                    assert line.startswith(GREETINGS[name][1]), f"{where} greets {line!r}\n{pod.log()}"
                else:
                    with socket.create_connection(("127.0.0.1", local_port), timeout=5):
                        pass
            except OSError as exc:
                raise AssertionError(f"{where} does not answer: {exc}\n{pod.log()}") from exc
    edge = release.pods["smtp-edge"]
    assert first_line(edge, "smtp").startswith(f"220 {edge.env['REMPART_HOSTNAME']} ESMTP Rempart")


def test_ha_values_grpc_readiness_probes_answer(release: Release) -> None:
    """ci/ha-values.yaml switches policy and auth to native gRPC readiness probes: the rendered
    probes are run against the same code (same ports as the default values)."""
    ha = render("-f", str(CHART / "ci" / "ha-values.yaml"))
    grpc_probes = 0
    for deployment in (o for o in ha if o["kind"] == "Deployment"):
        component = component_of(deployment)
        if component not in release.pods:
            continue
        probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        if "grpc" in probe:
            grpc_probes += 1
            ok, answer = probe_once(release.pods[component], probe)
            assert ok, f"{component}: {answer}\n{release.pods[component].log()}"
    assert grpc_probes >= 2, "ha-values renders no gRPC readiness probe"


def test_r_log_5_bootstrap_admin_from_rendered_secret_logs_in(release: Release) -> None:
    """admin-api created the first superadmin from the rendered credentials Secret."""
    pod = release.pods["admin-api"]
    body = json.dumps({"email": pod.env["REMPART_BOOTSTRAP_ADMIN_EMAIL"],
                       "password": pod.env["REMPART_BOOTSTRAP_ADMIN_PASSWORD"]})
    deadline = time.monotonic() + 20
    last = ""
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", pod.port("http"), timeout=10)
        try:
            conn.request("POST", "/v1/auth/login", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            last = f"{resp.status} {resp.read().decode(errors='replace')}"
            if resp.status == 200:
                break
        finally:
            conn.close()
        time.sleep(0.5)
    assert last.startswith("200 "), f"bootstrap admin login: {last}\n{pod.log()}"
    assert pod.env["REMPART_BOOTSTRAP_ADMIN_EMAIL"] == "admin@" + pod.env["REMPART_HOSTNAME"]


def test_helm_test_hook_sends_and_reads_back_a_message_through_the_chart_pods(release: Release,
                                                                              tmp_path: Path) -> None:
    """The `helm test` Pod (helmTests) as the kubelet would run it: its rendered command (the
    script from its ConfigMap), its env (the test account from the rendered Secret), its CA from
    the rendered TLS Secret; only the Services' addresses point at this machine's pods."""
    test_pods = [o for o in release.objects if o["kind"] == "Pod"
                 and (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    assert len(test_pods) == 1, "the chart renders no `helm test` Pod"
    spec = test_pods[0]["spec"]
    container = spec["containers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    script_path = container["command"][1]
    script_map = mounts[str(Path(script_path).parent)]["configMap"]["name"]
    config_map = next(o for o in release.objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == script_map)
    script = tmp_path / Path(script_path).name
    script.write_text(config_map["data"][Path(script_path).name])
    env = container_env(release.objects, container, test_pods[0]["metadata"]["name"])
    ca_dir = str(Path(env["ROUNDTRIP_TLS_CA"]).parent)
    ca_secret = mounts[ca_dir]["secret"]
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(secret_value(release.objects, ca_secret["secretName"], Path(env["ROUNDTRIP_TLS_CA"]).name))
    edge, imap = release.pods["smtp-edge"], release.pods["imap-pop"]

    def through_service(var: str) -> str:
        """host:port of a rendered Service -> the loopback port of the pod port it targets."""
        host, _, number = env[var].rpartition(":")
        service = next(o for o in release.objects if o["kind"] == "Service"
                       and host == f"{o['metadata']['name']}.{NAMESPACE}.svc.cluster.local")
        port = next(p for p in service["spec"]["ports"] if str(p["port"]) == number)
        pod = release.pods[service["spec"]["selector"]["app.kubernetes.io/component"]]
        return f"127.0.0.1:{pod.port(port['targetPort'])}"

    env |= {"ROUNDTRIP_SMTP": through_service("ROUNDTRIP_SMTP"), "ROUNDTRIP_IMAP": through_service("ROUNDTRIP_IMAP"),
            "ROUNDTRIP_TLS_CA": str(ca_file), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    # The bootstrap admin (the test account) exists once admin-api has made it.
    deadline = time.monotonic() + 60
    while True:
        run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                             check=False)
        if run.returncode == 0 or time.monotonic() > deadline or "235" in run.stdout:
            break
        time.sleep(1)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{edge.log()}\n{imap.log()}"
    assert "round trip of" in run.stdout and "passed" in run.stdout, run.stdout
    assert env["ROUNDTRIP_PASSWORD"] not in run.stdout + run.stderr


def test_chart_pods_drain_on_sigterm_within_grace_period(release: Release) -> None:
    started = time.monotonic()
    for pod in release.pods.values():
        assert pod.proc is not None and pod.proc.poll() is None, f"{pod.name} died:\n{pod.log()}"
        os.killpg(pod.proc.pid, signal.SIGTERM)
    for pod in release.pods.values():
        assert pod.proc is not None
        remaining = pod.grace - (time.monotonic() - started)
        try:
            code = pod.proc.wait(max(remaining, 0.1))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{pod.name} still running {pod.grace}s (terminationGracePeriodSeconds) "
                                 f"after SIGTERM:\n{pod.log()}") from None
        assert code == 0, f"{pod.name} exited {code} on SIGTERM:\n{pod.log()}"
