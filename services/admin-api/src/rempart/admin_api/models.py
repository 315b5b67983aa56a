"""Request and response bodies of the admin API.

Every client-supplied string and list has a bound. Secrets arrive as ``SecretStr`` (write-only
in the OpenAPI document, masked in reprs); no response model has a field that could carry a
password, a hash or a token, except :class:`LoginResponse` and the shown-once creations.
Secret settings are answered as summaries (:mod:`rempart.admin_api.redaction`).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, create_model

from rempart.admin_api.redaction import MailSettingsView, SecretSummary

Role = Literal["user", "domain_admin", "superadmin"]

MAX_ADDRESS = 254
MAX_DOMAIN = 253
MAX_PASSWORD = 1024
MAX_TEXT = 256
MAX_ALIAS_TARGETS = 100
MAX_LIST = 1000
MAX_EVENTS = 500


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _from_unix(value: Any) -> Any:
    # The directory and the auth service keep Unix seconds; answers show RFC 3339 (UTC, "Z").
    if isinstance(value, int | float) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    return value


Timestamp = Annotated[dt.datetime, BeforeValidator(_from_unix)]


class FieldError(BaseModel):
    """One refused input: where it is and what is wrong (never the value, which may be a secret)."""

    field: str = Field(description="Dotted path in the body (``ips.block_minutes``), or the parameter's name.")
    location: Literal["body", "query", "path", "header"] = "body"
    detail: str


class Problem(BaseModel):
    """Every error, as RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field(default="about:blank", description="about:blank: the status says it all.")
    title: str = Field(description="The HTTP status phrase.")
    status: int
    detail: str = Field(description="What went wrong, in a sentence meant for people.")
    instance: str | None = Field(default=None, description="The request path.")
    errors: list[FieldError] = Field(
        default_factory=list, description="For refused input: each field and rule (R-PWD-1: every password rule)."
    )


# Authentication -----------------------------------------------------------------------------
class LoginRequest(_Body):
    email: str = Field(min_length=1, max_length=MAX_ADDRESS)
    password: SecretStr = Field(min_length=1, max_length=MAX_PASSWORD)
    totp_code: str | None = Field(default=None, max_length=16)


class LoginResponse(BaseModel):
    token: str = Field(description="Opaque bearer token, shown once; send as 'Authorization: Bearer <token>'.")
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the scheme name
    expires_in: int
    account: str
    role: Role
    second_factor_enrolment_required: bool = Field(
        default=False,
        description="R-2FA-1: an admin without TOTP; this token only reaches /v1/me, /v1/me/totp* and "
        "logout until POST /v1/me/totp/confirm succeeds.",
    )


class PasswordChange(_Body):
    """R-PWD-3: the user's own password change."""

    old_password: SecretStr = Field(min_length=1, max_length=MAX_PASSWORD)
    new_password: SecretStr = Field(min_length=1, max_length=MAX_PASSWORD)
    confirm: SecretStr = Field(min_length=1, max_length=MAX_PASSWORD)


class PasswordReset(_Body):
    password: SecretStr = Field(min_length=1, max_length=MAX_PASSWORD)


# Directory ----------------------------------------------------------------------------------
class DomainCreate(_Body):
    name: str = Field(min_length=1, max_length=MAX_DOMAIN)
    description: str = Field(default="", max_length=MAX_TEXT)


class DomainOut(BaseModel):
    name: str
    description: str
    created: Timestamp | None
    accounts: int


class DomainList(BaseModel):
    domains: list[str]
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the next page; null at the end")


class AccountCreate(_Body):
    address: str = Field(min_length=1, max_length=MAX_ADDRESS, description="Full address or local part.")
    password: SecretStr = Field(min_length=1, max_length=MAX_PASSWORD)
    role: Role = "user"
    display_name: str = Field(default="", max_length=MAX_TEXT)


class AccountPatch(_Body):
    enabled: bool | None = None
    display_name: str | None = Field(default=None, max_length=MAX_TEXT)
    role: Role | None = Field(default=None, description="Only a superadmin may change a role.")


class AccountOut(BaseModel):
    address: str
    domain: str
    role: Role
    display_name: str
    enabled: bool
    created: Timestamp
    aliases: list[str]


class AccountList(BaseModel):
    accounts: list[str]
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the next page; null at the end")


class Counters(BaseModel):
    """R-LIM-3: messages sent to external recipients today (server time zone)."""

    address: str
    day: str
    timezone: str
    sent_external: int


class AliasCreate(_Body):
    alias: str = Field(min_length=3, max_length=MAX_ADDRESS)
    targets: list[str] = Field(min_length=1, max_length=MAX_ALIAS_TARGETS)


class AliasOut(BaseModel):
    alias: str
    targets: list[str]


class AliasTargets(_Body):
    targets: list[str] = Field(min_length=1, max_length=MAX_ALIAS_TARGETS)


class AliasList(BaseModel):
    aliases: list[AliasOut]
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the next page; null at the end")


class DomainPatch(_Body):
    description: str | None = Field(default=None, max_length=MAX_TEXT)


class DomainAliasCreate(_Body):
    """R-DOM-2: mail to any address of the alias domain goes to the same local part of ``target``."""

    target: str = Field(min_length=1, max_length=MAX_DOMAIN)


class DomainAliasOut(BaseModel):
    name: str
    target: str


class DomainAliasList(BaseModel):
    domain_aliases: list[DomainAliasOut]
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the next page; null at the end")


# Settings -----------------------------------------------------------------------------------
# The effective server settings, every secret shown as a SecretSummary (R-ADM-3).
ServerSettingsOut: type[BaseModel] = create_model(
    "ServerSettingsOut",
    __doc__="The effective server settings (defaults merged); secrets appear only as summaries.",
    version=(int, ...),
    settings=(MailSettingsView, ...),
)


class SrsRotation(_Body):
    """Rotate the SRS keys without anyone reading them: a new random key signs from now on."""

    keep_previous: int = Field(
        default=1, ge=0, le=4,
        description="How many of the current keys keep verifying (bounces to addresses signed before).",
    )


class SecretRotated(BaseModel):
    version: int
    srs_secrets: SecretSummary


class ScopedSettingsOut(BaseModel):
    scope: str
    version: int
    settings: dict[str, Any] = Field(description="Only the overrides stored at this scope.")


class SettingsVersion(BaseModel):
    version: int


# Events and blocks --------------------------------------------------------------------------
class EventOut(BaseModel):
    seq: int = Field(description="Stream sequence; pass as 'before' to page further back.")
    id: str = ""
    time: Timestamp | None = None
    area: str = ""
    what: str = ""
    service: str = ""
    client_ip: str = ""
    account: str = ""
    protocol: str = ""
    session_id: str = ""
    reason: str = ""
    attributes: dict[str, str] = Field(default_factory=dict)


class EventList(BaseModel):
    events: list[EventOut]
    next_before: int | None = Field(description="Sequence to continue from, or null at the start.")
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the next page; null at the end")


class IpBlock(BaseModel):
    """R-IPS-5: a blocked IP (or IPv6 prefix) and why, in words."""

    ip: str = Field(description="The blocked address; for an IPv6 prefix, its network address.")
    reason: str = Field(description="Why, in words: 'unknown recipients', 'failed logins', ...")
    blocked_at: Timestamp | None
    expires_at: Timestamp | None
    expires_in_seconds: int | None
    prefix: str = Field(default="", description="The IPv6 network the block covers, if any.")
    client_ip: str = Field(default="", description="The address whose connection tripped the block.")
    protocol: str = ""
    blocked_by: str = Field(default="", description="The administrator who blocked it by hand; empty: the policy")


class IpBlockList(BaseModel):
    blocks: list[IpBlock]
    truncated: bool = Field(description="More blocks follow (next_cursor is set)")
    next_cursor: str | None = Field(default=None, description="Pass as cursor for the next page; null at the end")


class IpBlockCreate(_Body):
    ip: str = Field(min_length=2, max_length=64, description="An IPv4 address, or an IPv6 address or network")
    reason: str = Field(min_length=1, max_length=200, description="Why, in words; shown in the block list")
    duration_minutes: int = Field(default=1440, ge=1, le=366 * 24 * 60)


# Two-step verification (R-2FA-1, R-2FA-2) and hash import ------------------------------------
MAX_CODE = 32
MAX_APP_NAME = 64
MAX_HASH = 512


class TotpEnrolment(BaseModel):
    """Shown once: the secret as text, as an otpauth URI, and as a QR code (PNG, base64)."""

    secret: str
    otpauth_uri: str
    qr_png_base64: str


class TotpCode(_Body):
    code: str = Field(min_length=1, max_length=MAX_CODE, description="A current TOTP code (or a recovery code)")


class RecoveryCodes(BaseModel):
    """Shown once; each works once in place of a TOTP code."""

    recovery_codes: list[str]


class TotpState(BaseModel):
    enabled: bool
    recovery_codes_left: int


class AppPasswordNew(_Body):
    name: str = Field(min_length=1, max_length=MAX_APP_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")


class AppPasswordCreated(BaseModel):
    """The password is shown once; only its Argon2id hash is kept."""

    name: str
    password: str
    created: Timestamp


class AppPasswordOut(BaseModel):
    name: str
    created: Timestamp
    last_used: Timestamp | None


class AppPasswordList(BaseModel):
    app_passwords: list[AppPasswordOut]


class PasswordHashImport(_Body):
    """Migration: a hash from another server, with its Dovecot-style scheme prefix."""

    hash: SecretStr = Field(min_length=1, max_length=MAX_HASH,
                            description="{ARGON2ID}, {BLF-CRYPT}, {SHA512-CRYPT} or {SSHA512}")


# Helpdesk (R-ADM-4) -------------------------------------------------------------------------
class UnlockResult(BaseModel):
    account: str
    was_locked: bool = Field(description="A lock was in force; recent failures are forgotten either way.")


class TotpResetResult(BaseModel):
    account: str
    was_enabled: bool = Field(description="TOTP was on; the account's sessions are ended either way.")


class AppPasswordsRevoked(BaseModel):
    account: str
    revoked: int


# API keys (R-ADM-1, R-ADM-3) ------------------------------------------------------------------
MAX_KEY_NAME = 64
MAX_KEY_DAYS = 3650


class ApiKeyCreate(_Body):
    name: str = Field(min_length=1, max_length=MAX_KEY_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    scope: Literal["read", "write"] = Field(default="read", description="read: GET only; write: also changes")
    domain: str | None = Field(
        default=None, max_length=MAX_DOMAIN,
        description="Confine the key to this domain (it acts as that domain's admin). A domain admin's keys are "
                    "always confined to its own domain.")
    expires_at: dt.datetime | None = Field(default=None, description="RFC 3339; at most 10 years ahead; null: never")


class ApiKeyOut(BaseModel):
    id: str
    name: str
    owner: str = Field(description="The account that made it: the key never does more than this account may now")
    scope: Literal["read", "write"]
    domain: str | None = Field(description="The domain it is confined to; null: not confined (a superadmin's)")
    created: Timestamp
    expires_at: Timestamp | None
    expired: bool
    last_used: Timestamp | None
    last_ip: str | None = Field(description="The address it was last used from")


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="Shown once: send as 'Authorization: Bearer <key>'. Only a keyed hash is kept.")


class ApiKeyList(BaseModel):
    api_keys: list[ApiKeyOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null at the end")
