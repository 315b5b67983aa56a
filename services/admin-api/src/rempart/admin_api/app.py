"""The FastAPI application, built by :func:`create_app` (never at import time)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

import grpc
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nats.errors import Error as NatsError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rempart.admin_api import (
    routes_aliases,
    routes_auth,
    routes_clientconfig,
    routes_cluster,
    routes_directory,
    routes_dkim,
    routes_events,
    routes_helpdesk,
    routes_ips,
    routes_queue,
    routes_settings,
    routes_stats,
    routes_twofactor,
)
from rempart.admin_api.backend import Backend, ProblemError
from rempart.admin_api.bodylimit import BodySizeLimit
from rempart.admin_api.console import mount_console
from rempart.admin_api.models import FieldError, Problem
from rempart.admin_api.redaction import Redactor
from rempart.admin_api.routes_cluster import KubernetesAccess
from rempart.admin_api.settings import AdminApiSettings

log = logging.getLogger(__name__)

UNAVAILABLE = "A backing service is unavailable, try again later"
TAGS = [
    {"name": "auth", "description": "Sessions (R-LOG-5: every other route needs a bearer token)."},
    {"name": "api-keys", "description": "API keys for scripts (R-ADM-1): read or write, optionally confined to a "
                                        "domain, never more than their creator may do; shown once when made."},
    {"name": "self-service", "description": "What any account may do for itself (R-PWD-3)."},
    {"name": "domains", "description": "Local domains and their settings overrides."},
    {"name": "accounts", "description": "Accounts, their passwords, settings and counters."},
    {"name": "aliases", "description": "Address aliases (R-DOM-2)."},
    {"name": "helpdesk", "description": "Unlock, reset 2FA, revoke app passwords and sessions (R-ADM-4)."},
    {"name": "settings", "description": "Server settings (R-OPS-1)."},
    {"name": "events", "description": "The audit and security event log."},
    {"name": "intrusion-prevention", "description": "IP blocks (R-IPS-5)."},
    {"name": "dkim", "description": "A domain's DKIM signing keys and the DNS records to publish (R-OUT-5)."},
    {"name": "queue", "description": "The outbound queue: messages waiting for remote delivery (R-OUT-2)."},
    {"name": "statistics", "description": "Messages accepted and refused, logins, blocked IPs, over time."},
    {"name": "cluster", "description": "The suite's pods, readiness and versions (Kubernetes)."},
]


PROBLEM_JSON = "application/problem+json"
API_DESCRIPTION = """\
Conventions of every route:

- **Errors** are RFC 9457 problem details (`application/problem+json`): `type`, `title`,
  `status`, `detail`, `instance`, and for refused input `errors`, each naming the `field` and its
  `location` (never the value).
- **No lost updates**: every writable resource answers with an `ETag`. Send it back in
  `If-Match` with a write: if the resource changed since, the answer is `412` (with the current
  `ETag`) and nothing is written. `If-Match` is optional (no `428`): a settings `PATCH` is an
  atomic deep merge that loses nothing without it; send it whenever you write back what you read.
- **Secrets are write-only**: a secret setting (`dns.srs_secrets`) is shown as its count and
  keyed fingerprints; send the summary back to keep it, a new value to set it, or rotate it.
- **Confinement**: a domain admin sees only its domain; anything of another is a `404`.
- **Times** are RFC 3339 strings in UTC.
"""


def _problem(request: Request, status: int, detail: str, errors: list[FieldError] | None = None,
             headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, instance=request.url.path,
                   errors=errors or [])
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers,
                        media_type=PROBLEM_JSON)


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return _problem(request, exc.status, exc.detail, exc.errors, exc.headers)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _problem(request, exc.status_code, str(exc.detail), headers=exc.headers)


def field_error(err: Mapping[str, Any]) -> FieldError:
    """A pydantic error as a FieldError: where (``body``/``query``/...) and what, never the input."""
    loc = [str(p) for p in err.get("loc", ())]
    location = loc[0] if loc and loc[0] in ("body", "query", "path", "header") else "body"
    path = loc[1:] if loc and loc[0] == location else loc
    return FieldError(field=".".join(path) or location, location=location, detail=str(err.get("msg", "")))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    # Only where and what, never the input: a rejected field may be a password.
    assert isinstance(exc, RequestValidationError)
    return _problem(request, 422, "Invalid request", [field_error(e) for e in exc.errors()][:50])


async def _on_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("dependency failure: %s", type(exc).__name__)
    return _problem(request, 503, UNAVAILABLE, headers={"Retry-After": "5"})


def _problem_media_type(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document says what the API sends: errors as ``application/problem+json``."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generate()
        for operations in spec.get("paths", {}).values():
            for operation in operations.values():
                if "requestBody" in operation:
                    # A body that is not JSON at all never reaches validation: FastAPI answers 400.
                    operation.setdefault("responses", {}).setdefault("400", {
                        "description": "The body cannot be parsed",
                        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
                    })
                for code, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if code.startswith(("4", "5")) and "application/json" in content:
                        content[PROBLEM_JSON] = content.pop("application/json")
        app.openapi_schema = spec
        return spec

    return openapi


def create_app(settings: AdminApiSettings, backend: Backend, cluster: KubernetesAccess | None = None) -> FastAPI:
    """The API over ``backend``; ``cluster`` is where GET /v1/cluster finds the Kubernetes API
    (by default what ``settings`` say: the pod's in-cluster configuration)."""
    app = FastAPI(
        title="Rempart admin API",
        version="1.0.0",
        description=API_DESCRIPTION,
        openapi_url="/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        openapi_tags=TAGS,
    )
    app.state.backend = backend
    app.state.settings = settings
    app.state.redactor = Redactor(settings.secret_key.get_secret_value())
    app.state.cluster = cluster if cluster is not None else KubernetesAccess.of(settings)
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    for error in (aioredis.RedisError, grpc.aio.AioRpcError, NatsError, ConnectionError, TimeoutError):
        app.add_exception_handler(error, _on_unavailable)
    modules = (routes_auth, routes_twofactor, routes_directory, routes_aliases, routes_helpdesk, routes_settings,
               routes_events, routes_ips, routes_clientconfig, routes_dkim, routes_queue, routes_stats, routes_cluster)
    for module in modules:
        # Any route may refuse its input (422) or lose Redis/NATS/auth (503): say so in the document.
        app.include_router(module.router, responses={422: {"model": Problem}, 503: {"model": Problem}})
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    mount_console(app, settings)  # the web console under / (issue 14)
    app.openapi = _problem_media_type(app)  # type: ignore[method-assign]
    return app
