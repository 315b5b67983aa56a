"""The first superadmin (deploy/helm ``admin.bootstrap``): created only while none exists.

The password goes through the auth service under the full policy (never ``skip_policy``), so
a weak bootstrap password is refused like any other. The password is never logged.

R-ADM-5: nothing is created while the audit stream cannot take the record (the same check as
the API's ``audit_ready``). Should JetStream fail between that check and the record's
acknowledgement, the record waits in Redis (``keys.ADMIN_BOOTSTRAP_AUDIT``) and the next attempt
writes it before anything else, with the same ``Nats-Msg-Id`` (a publish that did reach the
stream is not stored twice): a retry that finds the superadmin made never drops its record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from rempart.admin_api.backend import Backend, ProblemError
from rempart.admin_api.passwords import set_password
from rempart.admin_api.settings import AdminApiSettings
from rempart.common import keys
from rempart.common.audit import AuditUnavailable, new_record
from rempart.common.directory import DirectoryError, normalize_address, split_address

log = logging.getLogger(__name__)

RETRY_SECONDS = 2.0


async def superadmin_exists(backend: Backend) -> bool:
    directory = backend.directory
    for domain in await directory.list_domains():
        addresses = await directory.list_accounts(domain)
        if not addresses:
            continue
        async with backend.redis.pipeline(transaction=False) as pipe:
            for address in addresses:
                pipe.hget(keys.account(address), "role")
            roles = await pipe.execute()
        if "superadmin" in roles:
            return True
    return False


async def bootstrap_superadmin(settings: AdminApiSettings, backend: Backend) -> bool:
    """One attempt; True when finished (done, not needed, or hopeless), False to retry later."""
    email = normalize_address(settings.bootstrap_admin_email)
    secret = settings.bootstrap_admin_password
    if not email or secret is None or not secret.get_secret_value():
        return True
    pending = await backend.redis.get(keys.ADMIN_BOOTSTRAP_AUDIT)
    if pending is not None:
        return await _write_record(backend, json.loads(pending))
    if await superadmin_exists(backend):
        log.info("bootstrap admin not needed: a superadmin exists")
        return True
    try:
        _, domain = split_address(email)
    except DirectoryError:
        log.error("bootstrap admin email is not an address; no superadmin created")
        return True
    try:
        await backend.audit.ready()
    except AuditUnavailable:
        log.warning("bootstrap admin postponed: the audit stream is unavailable")
        return False
    directory = backend.directory
    created_domain = created_account = False
    if domain not in await directory.list_domains():
        try:
            await directory.add_domain(domain, "created for the bootstrap superadmin")
            created_domain = True
        except DirectoryError as exc:
            if "exists" not in str(exc):
                log.error("bootstrap admin domain refused: %s", exc)
                return True
    if await directory.get_account(email) is None:
        try:
            await directory.add_account(email, "superadmin", "Administrator")
            created_account = True
        except DirectoryError:
            return False  # another replica is creating it: look again later
    else:
        log.warning("bootstrap admin account exists: promoting it to superadmin", extra={"account": email})
        await backend.redis.hset(keys.account(email), mapping={"role": "superadmin", "enabled": "1"})
    try:
        await set_password(backend, email, secret.get_secret_value())
    except ProblemError as exc:
        if created_account:
            await directory.delete_account(email)
        if created_domain:
            await directory.delete_domain(domain)
        if exc.status == 422:
            log.error("bootstrap admin password refused by the policy: %s", "; ".join(e.detail for e in exc.errors))
            return True
        log.warning("bootstrap admin postponed: auth service unavailable")
        return False
    # R-ADM-5: the first superadmin is in the audit trail like any account an admin makes.
    record = new_record(
        actor="bootstrap", actor_ip="", action="bootstrap_superadmin", kind="account", object_id=email,
        domain=domain, after={"address": email, "role": "superadmin", "created": created_account})
    record["id"] = uuid.uuid5(uuid.NAMESPACE_URL, f"bootstrap:{email}").hex  # the same on every retry
    await backend.redis.set(keys.ADMIN_BOOTSTRAP_AUDIT, json.dumps(record))
    log.info("bootstrap superadmin created", extra={"account": email})
    return await _write_record(backend, record)


async def _write_record(backend: Backend, record: dict[str, Any]) -> bool:
    """The bootstrap's audit record, then its events; False (retried) while JetStream refuses."""
    named = record.get("object")
    email = str(named.get("id", "")) if isinstance(named, dict) else ""
    try:
        await backend.audit.write(record)
    except AuditUnavailable:
        log.warning("bootstrap admin's audit record postponed: the audit stream is unavailable")
        return False
    await backend.redis.delete(keys.ADMIN_BOOTSTRAP_AUDIT)
    await backend.events.publish("admin", "bootstrap_superadmin", account=email, actor="bootstrap", target=email)
    await backend.events.config_changed(f"account:{email}", await backend.store.version())
    return True


async def run_bootstrap(settings: AdminApiSettings, backend: Backend) -> None:
    while not await _attempt(settings, backend):
        await asyncio.sleep(RETRY_SECONDS)


async def _attempt(settings: AdminApiSettings, backend: Backend) -> bool:
    try:
        return await bootstrap_superadmin(settings, backend)
    except (OSError, ConnectionError) as exc:
        log.warning("bootstrap admin postponed: %s", type(exc).__name__)
        return False
