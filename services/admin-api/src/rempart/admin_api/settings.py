"""The admin API's process settings (``REMPART_*``), built once in ``main()``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator

from rempart.common.settings import ServiceSettings

SERVICEACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_SELECTOR = "app.kubernetes.io/part-of=rempart"
MAX_STATUS_URLS = 32
MAX_STATUS_NAME = 64
MAX_URL = 2048


class AdminApiSettings(ServiceSettings):
    ops_port: int = 9105
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    auth_target: str = "127.0.0.1:50052"
    grpc_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    session_ttl_seconds: int = Field(default=8 * 3600, ge=60, le=7 * 24 * 3600)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # The first superadmin (deploy/helm values ``admin.bootstrap``); used only while none exists.
    bootstrap_admin_email: str = ""
    bootstrap_admin_password: SecretStr | None = None
    # The web console (rempart.admin_api.console): its cookies are Secure unless this is off,
    # which only a dev or test process accepts (plain http on localhost).
    console_secure_cookies: bool = True
    # What mail clients are told by autoconfig/autodiscover (R-OPS-5): the public ports of the
    # load balancer in front of the edges (the chart's Services), not the pods' own.
    public_imaps_port: int = Field(default=993, ge=1, le=65535)
    public_pop3s_port: int = Field(default=995, ge=1, le=65535)
    public_smtps_port: int = Field(default=465, ge=1, le=65535)
    public_submission_port: int = Field(default=587, ge=1, le=65535)
    # MTA-STS (RFC 8461): the policy published for every local domain; mx defaults to
    # REMPART_HOSTNAME (a comma-separated list otherwise; "*.example.org" patterns allowed).
    mta_sts_mode: Literal["enforce", "testing", "none"] = "testing"
    mta_sts_mx: str = ""
    mta_sts_max_age_seconds: int = Field(default=7 * 24 * 3600, ge=86400, le=31557600)
    # R-ADM-5: how long the audit trail (the JetStream stream AUDIT) keeps records, and its
    # size; the oldest go first past either. 0: no limit of that kind.
    audit_max_age_days: int = Field(default=365, ge=0, le=36500)
    audit_max_bytes: int = Field(default=1 << 30, ge=0)
    # The cluster view (GET /v1/cluster, rempart.admin_api.routes_cluster): the Kubernetes API
    # where the kubelet says it is (KUBERNETES_SERVICE_HOST/PORT, set in every container; empty
    # outside Kubernetes), the pod's mounted service account, which pods to list, and how long
    # to wait for the answer.
    kubernetes_service_host: str = Field(
        default="", validation_alias=AliasChoices("KUBERNETES_SERVICE_HOST", "kubernetes_service_host"))
    kubernetes_service_port: int = Field(
        default=443, ge=1, le=65535,
        validation_alias=AliasChoices("KUBERNETES_SERVICE_PORT", "kubernetes_service_port"))
    cluster_serviceaccount_dir: Path = Path(SERVICEACCOUNT_DIR)
    cluster_label_selector: str = Field(default=DEFAULT_SELECTOR, max_length=1024)
    cluster_namespace: str = Field(default="", max_length=253)  # "": the service account's own
    cluster_timeout_seconds: float = Field(default=5.0, gt=0, le=30)

    # The console's status page outside Kubernetes: other services' ops ``/readyz``, probed each
    # time the page is shown (JSON object name -> http(s) URL; ``make run`` sets every service's).
    status_readiness_urls: dict[str, str] = Field(default_factory=dict)

    @field_validator("status_readiness_urls")
    @classmethod
    def _readiness_urls(cls, urls: dict[str, str]) -> dict[str, str]:
        if len(urls) > MAX_STATUS_URLS:
            raise ValueError(f"at most {MAX_STATUS_URLS} services")
        for name, url in urls.items():
            if not name.strip() or len(name) > MAX_STATUS_NAME or not name.isprintable():
                raise ValueError(f"a service's name is 1 to {MAX_STATUS_NAME} printable characters")
            try:
                parts = urlsplit(url)
                host = parts.hostname
            except ValueError:
                host = None
            if len(url) > MAX_URL or parts.scheme not in ("http", "https") or not host:
                raise ValueError(f"{name}: not an http(s) URL with a host")
        return urls

    @model_validator(mode="after")
    def _refuse_insecure_console(self) -> AdminApiSettings:
        if not self.console_secure_cookies and self.environment == "prod":
            raise ValueError("REMPART_CONSOLE_SECURE_COOKIES=false is only for plain-http development")
        return self
