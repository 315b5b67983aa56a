"""GET /v1/cluster against a real HTTPS server on loopback standing in for the Kubernetes API.

The admin API finds it the way it finds the real one in a pod: ``KUBERNETES_SERVICE_HOST`` and
``KUBERNETES_SERVICE_PORT``, and a service account directory (``token``, ``ca.crt``,
``namespace``; ``REMPART_CLUSTER_SERVICEACCOUNT_DIR`` points at the test's). The server checks
the bearer token, the namespace and the label selector, as the API server and the chart's Role do.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from rempart.common.tls import write_self_signed

from .conftest import Harness, make_settings

PROBLEM = "application/problem+json"
TOKEN = "sa-token-for-the-cluster-view-test"
NAMESPACE = "mail"


def pod(name: str, component: str, ready: bool, restarts: int = 0, version: str = "1.4.2") -> dict[str, object]:
    return {
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {
            "app.kubernetes.io/part-of": "rempart", "app.kubernetes.io/component": component,
            "app.kubernetes.io/version": version}},
        "spec": {"nodeName": "node-1", "containers": [{"name": component, "image": f"rempart/{component}:{version}"}]},
        "status": {
            "phase": "Running", "startTime": "2026-11-30T22:15:00Z",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [{"name": component, "ready": ready, "restartCount": restarts}],
        },
    }


@dataclass
class FakeApiServer:
    """What the stand-in answers, and what it was asked."""

    port: int = 0
    status: int = 200
    delay: float = 0.0
    items: list[dict[str, object]] = field(default_factory=list)
    requests: list[tuple[str, dict[str, list[str]], str]] = field(default_factory=list)


@pytest.fixture
def kube_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeApiServer]:
    """A Kubernetes API stand-in over TLS, and the pod's in-cluster configuration pointing at it.
    Requested before ``harness``, so that the app reads this configuration."""
    pair = write_self_signed(tmp_path / "apiserver", ["localhost", "127.0.0.1"])
    cert, key = pair.cert_file, pair.key_file
    state = FakeApiServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            state.requests.append((url.path, parse_qs(url.query), self.headers.get("Authorization", "")))
            time.sleep(state.delay)
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status, body = 401, {"kind": "Status", "code": 401}
            elif url.path != f"/api/v1/namespaces/{NAMESPACE}/pods":
                status, body = 404, {"kind": "Status", "code": 404}
            else:
                status, body = state.status, {"kind": "PodList", "metadata": {}, "items": state.items}
            raw = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
            except OSError:
                pass  # the client gave up (the timeout test)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN + "\n")
    (account / "namespace").write_text(NAMESPACE)
    (account / "ca.crt").write_text(Path(cert).read_text())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(state.port))
    monkeypatch.setenv("REMPART_CLUSTER_SERVICEACCOUNT_DIR", str(account))
    monkeypatch.setenv("REMPART_CLUSTER_TIMEOUT_SECONDS", "1")
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


async def test_cluster_view_lists_the_suites_pods_with_readiness_and_versions(
    kube_api: FakeApiServer, harness: Harness, admin_headers: dict[str, str]
) -> None:
    kube_api.items = [pod("rempart-smtp-edge-7d9f-x2", "smtp-edge", True, restarts=2),
                      pod("rempart-policy-5c4b-q1", "policy", False, version="1.4.3")]
    reply = await harness.http.get("/v1/cluster", headers=admin_headers)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["in_cluster"], body["reason"], body["namespace"], body["truncated"]) == (True, None, NAMESPACE, False)
    assert body["label_selector"] == "app.kubernetes.io/part-of=rempart"
    assert [(p["name"], p["component"], p["ready"], p["version"]) for p in body["pods"]] == [
        ("rempart-policy-5c4b-q1", "policy", False, "1.4.3"),
        ("rempart-smtp-edge-7d9f-x2", "smtp-edge", True, "1.4.2"),
    ]
    edge = body["pods"][1]
    assert (edge["images"], edge["phase"], edge["restarts"], edge["node"]) == (
        ["rempart/smtp-edge:1.4.2"], "Running", 2, "node-1")
    assert (edge["containers_ready"], edge["containers"], edge["started_at"]) == (1, 1, "2026-11-30T22:15:00Z")
    # One namespaced list, with the pod's token and the selector, bounded in size.
    ((path, query, authorization),) = kube_api.requests
    assert path == f"/api/v1/namespaces/{NAMESPACE}/pods" and authorization == f"Bearer {TOKEN}"
    assert query == {"labelSelector": ["app.kubernetes.io/part-of=rempart"], "limit": ["500"]}
    assert TOKEN not in reply.text


async def test_cluster_view_says_why_when_the_role_is_missing(
    kube_api: FakeApiServer, harness: Harness, admin_headers: dict[str, str]
) -> None:
    kube_api.status = 403
    reply = await harness.http.get("/v1/cluster", headers=admin_headers)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["in_cluster"] is True and body["pods"] == []
    assert "refused to list pods (403)" in body["reason"] and "rbac.clusterView" in body["reason"]


async def test_cluster_view_is_bounded_in_time(
    kube_api: FakeApiServer, harness: Harness, admin_headers: dict[str, str]
) -> None:
    kube_api.delay = 3.0  # the timeout is 1 s
    started = time.monotonic()
    reply = await harness.http.get("/v1/cluster", headers=admin_headers)
    assert time.monotonic() - started < 2.5
    assert reply.status_code == 200, reply.text
    assert reply.json()["reason"] == "the Kubernetes API did not answer within 1 s"


async def test_cluster_view_refuses_a_server_its_ca_does_not_vouch_for(
    kube_api: FakeApiServer, tmp_path: Path, harness: Harness, admin_headers: dict[str, str]
) -> None:
    other = write_self_signed(tmp_path / "other", ["localhost", "127.0.0.1"])
    account = harness.app.state.cluster.serviceaccount_dir
    shutil.copyfile(other.cert_file, account / "ca.crt")
    reply = await harness.http.get("/v1/cluster", headers=admin_headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["reason"].startswith("the Kubernetes API cannot be reached: ConnectError")
    assert kube_api.requests == []  # the token never went to an unverified server


async def test_cluster_view_without_a_mounted_token(
    kube_api: FakeApiServer, harness: Harness, admin_headers: dict[str, str]
) -> None:
    os.unlink(harness.app.state.cluster.serviceaccount_dir / "token")
    reply = await harness.http.get("/v1/cluster", headers=admin_headers)
    assert reply.status_code == 200, reply.text
    assert reply.json()["in_cluster"] is True and "no service account token" in reply.json()["reason"]


async def test_cluster_view_outside_a_cluster_says_so(
    monkeypatch: pytest.MonkeyPatch, harness: Harness, admin_headers: dict[str, str]
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    from rempart.admin_api.routes_cluster import KubernetesAccess

    # The settings of a process outside Kubernetes.
    outside = make_settings(harness.settings.redis_url, harness.settings.nats_url)
    assert outside.kubernetes_service_host == ""
    harness.app.state.cluster = KubernetesAccess.of(outside)
    reply = await harness.http.get("/v1/cluster", headers=admin_headers)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["in_cluster"], body["pods"], body["namespace"]) == (False, [], None)
    assert body["reason"].startswith("not running in Kubernetes")


async def test_r_adm_1_cluster_view_is_for_superadmins_only(harness: Harness) -> None:
    assert (await harness.http.get("/v1/cluster")).status_code == 401
    await harness.add_account("helpdesk@example.net", "Helpdesk-Pw-1234", "domain_admin")
    domain_admin = await harness.login("helpdesk@example.net", "Helpdesk-Pw-1234")
    reply = await harness.http.get("/v1/cluster", headers=domain_admin)
    assert reply.status_code == 403 and reply.headers["content-type"].startswith(PROBLEM)


async def test_cluster_view_refuses_a_namespace_that_is_not_a_name(
    kube_api: FakeApiServer, harness: Harness, admin_headers: dict[str, str]
) -> None:
    (harness.app.state.cluster.serviceaccount_dir / "namespace").write_text("mail/../../../apis")
    reply = await harness.http.get("/v1/cluster", headers=admin_headers)
    assert reply.status_code == 200, reply.text
    assert "no usable namespace" in reply.json()["reason"] and kube_api.requests == []


def test_cluster_view_settings_are_the_admin_apis_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """One settings object: the REMPART_CLUSTER_* and KUBERNETES_SERVICE_* names are read by
    AdminApiSettings, and the cluster view is built from it."""
    from rempart.admin_api.routes_cluster import KubernetesAccess

    for name, value in (("KUBERNETES_SERVICE_HOST", "fd00::1"), ("KUBERNETES_SERVICE_PORT", "6443"),
                        ("REMPART_CLUSTER_SERVICEACCOUNT_DIR", "/sa"), ("REMPART_CLUSTER_NAMESPACE", "mail"),
                        ("REMPART_CLUSTER_LABEL_SELECTOR", "app.kubernetes.io/instance=r1"),
                        ("REMPART_CLUSTER_TIMEOUT_SECONDS", "2.5")):
        monkeypatch.setenv(name, value)
    access = KubernetesAccess.of(make_settings("redis://127.0.0.1:1", "nats://127.0.0.1:1"))
    assert access == KubernetesAccess(service_host="fd00::1", service_port=6443, serviceaccount_dir=Path("/sa"),
                                      label_selector="app.kubernetes.io/instance=r1", namespace="mail",
                                      timeout_seconds=2.5)
    assert access.base_url() == "https://[fd00::1]:6443"
    monkeypatch.setenv("REMPART_CLUSTER_TIMEOUT_SECONDS", "0")
    with pytest.raises(ValueError, match="cluster_timeout_seconds"):
        make_settings("redis://127.0.0.1:1", "nats://127.0.0.1:1")
