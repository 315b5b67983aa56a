"""What every route needs: the shared clients, the caller, role checks, errors and audit.

The routes get these through FastAPI dependencies; the :class:`Backend` is built once by the
service (or a test) and handed to :func:`rempart.admin_api.app.create_app`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from nats.js import JetStreamContext

from rempart.admin_api.apikeys import ApiKeyStore, parse_key, revoke_keys_of
from rempart.admin_api.models import FieldError, Role
from rempart.admin_api.redaction import Redactor
from rempart.admin_api.sessions import SessionStore
from rempart.common.audit import AuditLog, AuditRetention, AuditUnavailable, new_record
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
    audit_retention: AuditRetention = field(default_factory=AuditRetention)

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.js, self.audit_retention)

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
    api_key: str = ""  # the id of the API key the caller used; "" for a session
    read_only: bool = False  # an API key of scope "read" (R-ADM-1): every write is a 403

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


READS = ("GET", "HEAD", "OPTIONS")
# What an API key never reaches: a person's own credentials and sessions (password, TOTP, app
# passwords, logout), and the making of keys (a key cannot mint a longer-lived one).
NOT_WITH_API_KEY = ("/v1/me", "/v1/auth/", "/v1/api-keys")
API_KEY_REFUSED = "Not with an API key: sign in with a session"
READ_ONLY_KEY = "This API key may only read"


def api_keys(request: Request) -> ApiKeyStore:
    settings = request.app.state.settings
    backend: Backend = request.app.state.backend
    return ApiKeyStore(backend.redis, settings.secret_key.get_secret_value())


async def key_principal(backend: Backend, request: Request, token: str) -> Principal | None:
    """The caller an API key stands for (R-ADM-1): never more than its creator may do now."""
    key = await api_keys(request).authenticate(token, client_ip(request))
    if key is None:
        return None
    owner = await backend.directory.get_account(key.owner)
    if owner is None or not owner.enabled or owner.created != key.owner_created:
        return None
    if owner.session_epoch != key.owner_epoch:
        return None  # R-ADM-4: its creator's sessions were ended since (password, 2FA reset, helpdesk)
    role: Role = owner.role
    domain = owner.domain
    if role == "domain_admin" and key.domain and key.domain != owner.domain:
        return None  # its creator moved: the key confined elsewhere is worth nothing
    if key.domain and role != "user":
        role, domain = "domain_admin", key.domain
    return Principal(owner.address, domain, role, token, api_key=key.id, read_only=key.scope != "write")


async def current_principal(
    request: Request,
    backend: BackendDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """R-LOG-5: every route but login requires a live session of an existing, enabled account,
    or a live API key (R-ADM-1) of one."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise not_authenticated()
    token = credentials.credentials
    if parse_key(token) is not None:
        principal = await key_principal(backend, request, token)
        if principal is None:
            raise not_authenticated("Invalid, expired or revoked API key")
        path = request.url.path
        if path.rstrip("/") == "/v1/me" or path.startswith(NOT_WITH_API_KEY):
            raise ProblemError(403, API_KEY_REFUSED)
        if principal.read_only and request.method not in READS:
            raise ProblemError(403, READ_ONLY_KEY)
        request.state.api_key = principal.api_key
        return principal
    principal = await session_principal(backend, token)
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


async def end_sessions(backend: Backend, address: str, keep: str | None = None) -> int:
    """R-ADM-4: end every admin API session of ``address``, except the session ``keep``, and
    every API key it made (a key made by a thief with a phished session must not outlive the
    password reset): the number of keys deleted. The epoch bump alone already refuses the keys
    (:func:`key_principal`); deleting them keeps the listing true."""
    epoch = await backend.directory.end_sessions(address)
    if keep is not None and epoch is not None:
        await backend.sessions.adopt_epoch(keep, epoch)
    revoked = await revoke_keys_of(backend.redis, normalize_address(address))
    if revoked:
        log.info("api keys revoked with the sessions", extra={"account": address, "api_keys": revoked})
    return len(revoked)  # audited as api_access_revoked: the redactor hides any detail named like a key


def client_ip(request: Request) -> str:
    # The direct peer: the admin API does not trust X-Forwarded-For (no trusted proxy list yet).
    return request.client.host if request.client else ""


async def audit_ready(request: Request, principal: PrincipalDep) -> None:
    """R-ADM-5, fail closed: an audited write starts only if its audit record can be written.

    A write route depends on this (its router's dependencies); a read passes straight through.
    The check is made *before* the write, not undone after it: most writes cannot be rolled back
    cleanly (a password set in the auth service, sessions ended, a message dropped from the
    queue, a DKIM key made), so the API refuses with 503 while JetStream cannot take a record,
    and nothing changes. In the short window where JetStream fails between this check and the
    record's acknowledgement, the write is done, the answer is still 503, and the whole record
    is logged at ERROR level so that the trail has no silent hole. (The caller is authenticated
    first: a stranger gets its 401, not a 503.)
    """
    if request.method in READS:
        return
    backend: Backend = request.app.state.backend
    await backend.audit.ready()


AuditReady = Depends(audit_ready)


def _object_of(what: str, target: str, scope: str) -> tuple[str, str]:
    """(object kind, its domain) for a change named the legacy way (``scope``)."""
    kind, _, name = scope.partition(":")
    if scope == "server":
        return "settings", ""
    if kind in ("account", "alias"):
        return kind, name.rpartition("@")[2]
    if kind == "domain":
        return "domain", name
    if kind == "ips":
        return "ip_block", ""
    return kind or "other", ""


async def audit(
    backend: Backend,
    request: Request,
    actor: str,
    action: str,
    *,
    kind: str,
    object_id: str,
    domain: str = "",
    before: Any = None,
    after: Any = None,
    details: dict[str, str] | None = None,
) -> None:
    """The one way an admin write is recorded (R-ADM-5): the durable record on the ``AUDIT``
    stream, acknowledged before the API answers (503 otherwise), then the ``admin/<action>``
    event on the event log for whoever follows it live. ``before`` and ``after`` are redacted
    here (R-ADM-3): secret settings as keyed fingerprints, anything named like a secret dropped."""
    redactor: Redactor = request.app.state.redactor
    record = new_record(
        actor=actor, actor_ip=client_ip(request), action=action, kind=kind, object_id=object_id, domain=domain,
        api_key=str(getattr(request.state, "api_key", "") or ""), before=redactor.audit_state(before),
        after=redactor.audit_state(after), details=redactor.attributes(details or {}),
    )
    try:
        await backend.audit.write(record)
    except AuditUnavailable:
        log.error("admin change made but its audit record was not written", extra={"audit": record})
        raise
    await backend.events.publish("admin", action, client_ip=client_ip(request), account=actor, actor=actor,
                                 target=object_id, **(details or {}))
    log.info("admin change", extra={"what": action, "actor": actor, "target": object_id})


async def record_change(
    backend: Backend, request: Request, actor: str, what: str, target: str, scope: str, *,
    kind: str | None = None, domain: str | None = None, before: Any = None, after: Any = None,
    **details: str,
) -> None:
    """After every write of settings or the directory: the audit record (:func:`audit`) and
    ``rempart.config.changed`` for the services that cache them."""
    derived_kind, derived_domain = _object_of(what, target, scope)
    await audit(backend, request, actor, what, kind=kind or derived_kind, object_id=target,
                domain=derived_domain if domain is None else domain, before=before, after=after,
                details=details or None)
    try:
        version = await backend.store.version()
        await backend.events.config_changed(scope, version)
    except Exception as exc:  # noqa: BLE001 - the write is done; pollers see the version move
        log.warning("config.changed not published: %s", exc)


async def record_action(
    backend: Backend, request: Request, actor: str, what: str, target: str, *, kind: str = "other",
    domain: str = "", before: Any = None, after: Any = None, **changed: str
) -> None:
    """After a write that changes no settings and no directory entry (an action on the mail
    queue, an API key, an IP block): the audit record, and no ``config.changed``."""
    await audit(backend, request, actor, what, kind=kind, object_id=target, domain=domain, before=before,
                after=after, details=changed or None)
