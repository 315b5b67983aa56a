"""The FastAPI application, built by :func:`create_app` (never at import time)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

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
    routes_directory,
    routes_events,
    routes_helpdesk,
    routes_ips,
    routes_settings,
    routes_twofactor,
)
from rempart.admin_api.backend import Backend, ProblemError
from rempart.admin_api.bodylimit import BodySizeLimit
from rempart.admin_api.models import Problem
from rempart.admin_api.redaction import Redactor
from rempart.admin_api.settings import AdminApiSettings

log = logging.getLogger(__name__)

UNAVAILABLE = "A backing service is unavailable, try again later"
TAGS = [
    {"name": "auth", "description": "Sessions (R-LOG-5: every other route needs a bearer token)."},
    {"name": "self-service", "description": "What any account may do for itself (R-PWD-3)."},
    {"name": "domains", "description": "Local domains and their settings overrides."},
    {"name": "accounts", "description": "Accounts, their passwords, settings and counters."},
    {"name": "aliases", "description": "Address aliases (R-DOM-2)."},
    {"name": "helpdesk", "description": "Unlock, reset 2FA, revoke app passwords and sessions (R-ADM-4)."},
    {"name": "settings", "description": "Server settings (R-OPS-1)."},
    {"name": "events", "description": "The audit and security event log."},
    {"name": "intrusion-prevention", "description": "IP blocks (R-IPS-5)."},
]


def _problem(status: int, detail: str, violations: list[str] | None = None,
             headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = Problem(detail=detail, violations=violations or [])
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _on_problem(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return _problem(exc.status, exc.detail, exc.violations, exc.headers)


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _problem(exc.status_code, str(exc.detail), headers=exc.headers)


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    # Only where and what, never the input: a rejected field may be a password.
    assert isinstance(exc, RequestValidationError)
    violations = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}" for err in exc.errors()]
    return _problem(422, "Invalid request", violations[:50])


async def _on_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("dependency failure: %s", type(exc).__name__)
    return _problem(503, UNAVAILABLE, headers={"Retry-After": "5"})


def create_app(settings: AdminApiSettings, backend: Backend) -> FastAPI:
    app = FastAPI(
        title="Rempart admin API",
        version="1.0.0",
        openapi_url="/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        openapi_tags=TAGS,
    )
    app.state.backend = backend
    app.state.settings = settings
    app.state.redactor = Redactor(settings.secret_key.get_secret_value())
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    for error in (aioredis.RedisError, grpc.aio.AioRpcError, NatsError, ConnectionError, TimeoutError):
        app.add_exception_handler(error, _on_unavailable)
    modules = (routes_auth, routes_twofactor, routes_directory, routes_aliases, routes_helpdesk, routes_settings,
               routes_events, routes_ips)
    for module in modules:
        # Any route may refuse its input (422) or lose Redis/NATS/auth (503): say so in the document.
        app.include_router(module.router, responses={422: {"model": Problem}, 503: {"model": Problem}})
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
