"""What every route needs: the shared clients, the caller, role checks, errors and audit.

The routes get these through FastAPI dependencies; the :class:`Backend` is built once by the
service (or a test) and handed to :func:`rempart.admin_api.app.create_app`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Literal

import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nats.js import JetStreamContext

from rempart.admin_api.models import FieldError, Role
from rempart.admin_api.redaction import Redactor
from rempart.admin_api.sessions import SessionStore
from rempart.common.clients import AuthClient
from rempart.common.config import SettingsStore
from rempart.common.directory import Account, Directory, normalize_address
from rempart.common.events import EventBus

log = logging.getLogger(__name__)


@dataclass
class Backend:
    redis: aioredis.Redis
    js: JetStreamContext
    events: EventBus
    auth: AuthClient
    sessions: SessionStore

    @property
    def directory(self) -> Directory:
        return Directory(self.redis)

    @property
    def store(self) -> SettingsStore:
        return SettingsStore(self.redis)


class ProblemError(Exception):
    """An error answered as :class:`rempart.admin_api.models.Problem` (RFC 9457)."""

    def __init__(
        self,
        status: int,
        detail: str,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.headers = headers


def invalid(detail: str, field: str, problem: str, location: Literal["body", "query", "path"] = "body") -> ProblemError:
    """422 naming one refused field."""
    return ProblemError(422, detail, [FieldError(field=field, location=location, detail=problem)])


UNAUTHENTICATED = "Not authenticated"
BEARER = {"WWW-Authenticate": "Bearer"}


def not_authenticated(detail: str = UNAUTHENTICATED) -> ProblemError:
    return ProblemError(401, detail, headers=BEARER)


def forbidden() -> ProblemError:
    return ProblemError(403, "Not allowed for this role")


def not_found(what: str) -> ProblemError:
    return ProblemError(404, f"{what} not found")


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, as the directory knows it now (role and enabled re-read per request)."""

    address: str
    domain: str
    role: Role
    token: str
    restricted: bool = False

    @property
    def is_superadmin(self) -> bool:
        return self.role == "superadmin"

    def can_manage_domain(self, domain: str) -> bool:
        return self.is_superadmin or (self.role == "domain_admin" and normalize_address(domain) == self.domain)

    def can_manage_account(self, account: Account) -> bool:
        # A domain admin must not take over a superadmin of its domain (password reset, delete).
        if self.is_superadmin:
            return True
        return self.can_manage_domain(account.domain) and account.role != "superadmin"


def get_backend(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


BackendDep = Annotated[Backend, Depends(get_backend)]


def get_redactor(request: Request) -> Redactor:
    redactor: Redactor = request.app.state.redactor
    return redactor


RedactorDep = Annotated[Redactor, Depends(get_redactor)]
_bearer = HTTPBearer(auto_error=False, description="Session token from POST /v1/auth/login")


ENROLMENT_REQUIRED = "Two-step verification must be set up first: POST /v1/me/totp, then /v1/me/totp/confirm"
# What a restricted session (an admin who has not enrolled TOTP yet, R-2FA-1) may reach.
ENROLMENT_PATHS = ("/v1/me", "/v1/me/totp", "/v1/me/totp/confirm", "/v1/auth/logout")


async def session_principal(backend: Backend, token: str) -> Principal | None:
    """The caller a session token stands for, or None: the session must be live and its account
    exist, be enabled, be the same incarnation and not have ended its sessions since. The API's
    bearer tokens and the web console's session cookie both go through here."""
    session = await backend.sessions.account_for(token)
    if session is None:
        return None
    account = await backend.directory.get_account(session.account)
    if (
        account is None
        or not account.enabled
        or account.created != session.account_created
        or account.session_epoch != session.epoch
    ):
        await backend.sessions.revoke(token)
        return None
    return Principal(account.address, account.domain, account.role, token, session.restricted)


async def current_principal(
    request: Request,
    backend: BackendDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """R-LOG-5: every route but login requires a live session of an existing, enabled account."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise not_authenticated()
    principal = await session_principal(backend, credentials.credentials)
    if principal is None:
        raise not_authenticated("Invalid or expired session")
    if principal.restricted and request.url.path.rstrip("/") not in ENROLMENT_PATHS:
        raise ProblemError(403, ENROLMENT_REQUIRED)
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]


async def require_admin(principal: PrincipalDep) -> Principal:
    if principal.role not in ("superadmin", "domain_admin"):
        raise forbidden()
    return principal


async def require_superadmin(principal: PrincipalDep) -> Principal:
    if not principal.is_superadmin:
        raise forbidden()
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
SuperadminDep = Annotated[Principal, Depends(require_superadmin)]


async def end_sessions(backend: Backend, address: str, keep: str | None = None) -> None:
    """R-ADM-4: end every admin API session of ``address``, except the session ``keep``."""
    epoch = await backend.directory.end_sessions(address)
    if keep is not None and epoch is not None:
        await backend.sessions.adopt_epoch(keep, epoch)


def client_ip(request: Request) -> str:
    # The direct peer: the admin API does not trust X-Forwarded-For (no trusted proxy list yet).
    return request.client.host if request.client else ""


async def record_change(
    backend: Backend, request: Request, actor: str, what: str, target: str, scope: str
) -> None:
    """After every write: the audit event ``admin/<what>`` and ``rempart.config.changed``."""
    await backend.events.publish("admin", what, client_ip=client_ip(request), account=actor, actor=actor, target=target)
    try:
        version = await backend.store.version()
        await backend.events.config_changed(scope, version)
    except Exception as exc:  # noqa: BLE001 - the write is done; pollers see the version move
        log.warning("config.changed not published: %s", exc)
    log.info("admin change", extra={"what": what, "actor": actor, "target": target})


async def record_action(
    backend: Backend, request: Request, actor: str, what: str, target: str, **changed: str
) -> None:
    """After a write that changes no settings and no directory entry (an action on the mail
    queue): the audit event ``admin/<what>`` with what changed, and no ``config.changed``."""
    await backend.events.publish("admin", what, client_ip=client_ip(request), account=actor, actor=actor,
                                 target=target, **changed)
    log.info("admin action", extra={"what": what, "actor": actor, "target": target})
