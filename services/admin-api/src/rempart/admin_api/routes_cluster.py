"""``GET /v1/cluster``: the suite's pods, their readiness and versions, from the Kubernetes API.

In a pod, the API server is at ``KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT`` (set by the
kubelet in every container) and the pod's service account is mounted at
``/var/run/secrets/kubernetes.io/serviceaccount/`` (``token``, ``ca.crt``, ``namespace``): the
same in-cluster configuration the ``kubernetes`` client reads, spoken here with httpx (one
namespaced ``GET /api/v1/namespaces/{ns}/pods?labelSelector=...``). The chart's Role allows only
``get`` and ``list`` on pods in the release's namespace.

Pods are selected by ``app.kubernetes.io/part-of=rempart`` (every pod of the chart carries it,
with ``app.kubernetes.io/component`` and ``app.kubernetes.io/version``);
``REMPART_CLUSTER_LABEL_SELECTOR`` narrows it (e.g. to one release:
``app.kubernetes.io/instance=<release>,app.kubernetes.io/part-of=rempart``).

Outside a cluster, or when the API cannot be asked or does not answer, the answer is still a
``200`` that says why (``reason``), never a 500: this view is how an administrator finds out
that the cluster is the problem.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from rempart.admin_api.backend import SuperadminDep
from rempart.admin_api.models import Problem
from rempart.admin_api.settings import DEFAULT_SELECTOR, SERVICEACCOUNT_DIR, AdminApiSettings

log = logging.getLogger(__name__)

router = APIRouter(tags=["cluster"])
_P = {"model": Problem}
MAX_PODS = 500  # one page of the list; more is said (truncated), not fetched
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_TOKEN_BYTES = 64 * 1024
MAX_REASON = 300
NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123 label: it goes into the URL path


@dataclass(frozen=True)
class KubernetesAccess:
    """Where the Kubernetes API is and how to reach it (the in-cluster configuration), as the
    admin API's settings say (:meth:`of`); the defaults are a process outside Kubernetes."""

    service_host: str = ""
    service_port: int = 443
    serviceaccount_dir: Path = Path(SERVICEACCOUNT_DIR)
    label_selector: str = DEFAULT_SELECTOR
    namespace: str = ""
    timeout_seconds: float = 5.0

    @classmethod
    def of(cls, settings: AdminApiSettings) -> KubernetesAccess:
        return cls(service_host=settings.kubernetes_service_host, service_port=settings.kubernetes_service_port,
                   serviceaccount_dir=settings.cluster_serviceaccount_dir,
                   label_selector=settings.cluster_label_selector, namespace=settings.cluster_namespace,
                   timeout_seconds=settings.cluster_timeout_seconds)

    def base_url(self) -> str:
        host = self.service_host.strip()
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass  # a name
        return f"https://{host}:{self.service_port}"


class PodOut(BaseModel):
    name: str
    component: str = Field(description="The pod's app.kubernetes.io/component label (smtp-edge, policy, ...).")
    version: str = Field(description="The pod's app.kubernetes.io/version label.")
    images: list[str] = Field(description="The images of its containers.")
    phase: str = Field(description="Pending, Running, Succeeded, Failed or Unknown.")
    ready: bool = Field(description="The pod's Ready condition: it receives traffic.")
    containers_ready: int
    containers: int
    restarts: int = Field(description="Container restarts, summed.")
    node: str
    started_at: dt.datetime | None = None


class ClusterOut(BaseModel):
    in_cluster: bool = Field(description="Whether this API runs in a Kubernetes pod.")
    reason: str | None = Field(default=None, description="Why the pods could not be listed; null when they were.")
    namespace: str | None = None
    label_selector: str
    pods: list[PodOut] = Field(default_factory=list)
    truncated: bool = Field(default=False, description=f"More than {MAX_PODS} pods matched; the first are shown.")


class ClusterUnavailable(Exception):
    """The pods could not be listed; the message says why, for people."""


def _read(path: Path, limit: int) -> str:
    with path.open("rb") as handle:
        return handle.read(limit).decode().strip()


def _pod(item: dict[str, Any]) -> PodOut:
    meta = item.get("metadata") or {}
    labels = meta.get("labels") or {}
    spec = item.get("spec") or {}
    status = item.get("status") or {}
    statuses = status.get("containerStatuses") or []
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or [] if isinstance(c, dict)}
    started = status.get("startTime")
    try:
        started_at = dt.datetime.fromisoformat(str(started).replace("Z", "+00:00")) if started else None
    except ValueError:
        started_at = None
    return PodOut(
        name=str(meta.get("name", "")),
        component=str(labels.get("app.kubernetes.io/component", "")),
        version=str(labels.get("app.kubernetes.io/version", "")),
        images=[str(c.get("image", "")) for c in spec.get("containers") or [] if isinstance(c, dict)],
        phase=str(status.get("phase", "Unknown")),
        ready=conditions.get("Ready") == "True",
        containers_ready=sum(1 for c in statuses if isinstance(c, dict) and c.get("ready") is True),
        containers=len(spec.get("containers") or []),
        restarts=sum(int(c.get("restartCount", 0) or 0) for c in statuses if isinstance(c, dict)),
        node=str(spec.get("nodeName", "")),
        started_at=started_at,
    )


async def _get_pods(access: KubernetesAccess, namespace: str, token: str, ca_file: Path) -> dict[str, Any]:
    try:
        tls = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ClusterUnavailable(f"the service account's CA ({ca_file}) cannot be read: {type(exc).__name__}") from None
    url = f"{access.base_url()}/api/v1/namespaces/{namespace}/pods"
    params = {"labelSelector": access.label_selector, "limit": str(MAX_PODS)}
    timeout = httpx.Timeout(access.timeout_seconds, connect=min(access.timeout_seconds, 3.0))
    try:
        async with httpx.AsyncClient(verify=tls, timeout=timeout, trust_env=False) as client:
            async with client.stream("GET", url, params=params, headers={
                "Authorization": f"Bearer {token}", "Accept": "application/json"}) as reply:
                body = bytearray()
                async for chunk in reply.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise ClusterUnavailable("the Kubernetes API's answer is too large")
                status = reply.status_code
    except httpx.TimeoutException:
        raise ClusterUnavailable(f"the Kubernetes API did not answer within {access.timeout_seconds:g} s") from None
    except httpx.HTTPError as exc:
        raise ClusterUnavailable(f"the Kubernetes API cannot be reached: {type(exc).__name__}: {exc}") from None
    if status in (401, 403):
        raise ClusterUnavailable(f"the Kubernetes API refused to list pods ({status}): the admin API's service "
                                 "account needs get and list on pods in its namespace (the chart's "
                                 "rbac.clusterView)")
    if status != 200:
        raise ClusterUnavailable(f"the Kubernetes API answered {status}")
    try:
        decoded = json.loads(bytes(body))
    except ValueError:
        raise ClusterUnavailable("the Kubernetes API's answer is not JSON") from None
    if not isinstance(decoded, dict):
        raise ClusterUnavailable("the Kubernetes API's answer is not a pod list")
    return decoded


async def list_pods(access: KubernetesAccess) -> ClusterOut:
    """The pods the selector matches, or why they cannot be listed (never raises)."""
    out = ClusterOut(in_cluster=False, label_selector=access.label_selector)
    if not access.service_host.strip():
        out.reason = "not running in Kubernetes (KUBERNETES_SERVICE_HOST is not set): no pods to show"
        return out
    out.in_cluster = True
    account = access.serviceaccount_dir
    try:
        namespace = access.namespace or _read(account / "namespace", 256)
        token = _read(account / "token", MAX_TOKEN_BYTES)
    except (OSError, UnicodeDecodeError):
        out.reason = (f"no service account token at {account} (the chart's rbac.clusterView is off, or "
                      "automountServiceAccountToken is false)")
        return out
    if not NAMESPACE.fullmatch(namespace) or not token:
        out.reason = f"the service account at {account} has no usable namespace or token"
        return out
    out.namespace = namespace
    try:
        pods = await _get_pods(access, namespace, token, account / "ca.crt")
        items = pods.get("items")
        if not isinstance(items, list):
            raise ClusterUnavailable("the Kubernetes API's answer is not a pod list")
        out.pods = sorted((_pod(i) for i in items if isinstance(i, dict)), key=lambda p: (p.component, p.name))
    except ClusterUnavailable as exc:
        out.reason = str(exc)[:MAX_REASON]
        log.warning("cluster view: %s", out.reason)
        return out
    except (TypeError, ValueError, AttributeError) as exc:
        out.reason = f"the Kubernetes API's pod list could not be read: {type(exc).__name__}"
        return out
    out.truncated = bool((pods.get("metadata") or {}).get("continue"))
    return out


@router.get("/v1/cluster", operation_id="getCluster", response_model=ClusterOut, responses={401: _P, 403: _P},
            description="The suite's pods in this namespace (label selector "
                        f"`{DEFAULT_SELECTOR}` unless configured), their readiness and versions, "
                        "read from the Kubernetes API with the admin API's service account. Outside a "
                        "cluster, or when the API refuses or does not answer, `reason` says why.")
async def get_cluster(request: Request, principal: SuperadminDep) -> ClusterOut:
    access: KubernetesAccess = request.app.state.cluster
    return await list_pods(access)
