"""R-LOG-2: from the login name a client typed to the canonical account address.

- ``convert_percent_slash``: ``bob%example.org`` and ``bob/example.org`` mean ``bob@example.org``
  (clients and old UUCP-style gateways that cannot send ``@`` in a user name).
- ``login_with = "address_only"``: a bare name never matches.
- A bare name ``bob`` matches when exactly one local domain has an account ``bob``; with two or
  more it is ambiguous and matches nothing (guessing one would let ``bob`` of one domain try
  passwords against ``bob`` of another).
- Domain aliases always resolve (``bob@alias.example`` is ``bob@example.org``); with
  ``aliases_as_login`` an alias address that leads to exactly one local account logs in as it.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from rempart.common import keys
from rempart.common.config import LoginSettings
from rempart.common.directory import Account, Directory
from rempart.common.sasl import normalize_login

MAX_LOGIN_LENGTH = 320  # 64 (local part) + 1 + 255 (domain): RFC 5321 section 4.5.3.1


@dataclass(frozen=True)
class LoginName:
    typed: str  # normalised as typed: the subject of failure counting when no account matches
    account: str | None  # the canonical account address, when one matches
    domain: str  # the local domain the name points into, "" when none
    # The account's directory record as read to resolve the name, so that the login does not
    # read it a second time; None when no account matched or the record was not read.
    record: Account | None = None


async def resolve_login(directory: Directory, redis: aioredis.Redis, login: str, rules: LoginSettings) -> LoginName:
    name = normalize_login(login, rules)
    if not name or len(name) > MAX_LOGIN_LENGTH or any(c.isspace() or ord(c) < 32 for c in name):
        return LoginName(name[:MAX_LOGIN_LENGTH], None, "")
    if "@" not in name:
        if rules.login_with == "address_only":
            return LoginName(name, None, "")
        return await _resolve_bare(directory, redis, name)
    local, _, domain_part = name.rpartition("@")
    if not local or "@" in local:
        return LoginName(name, None, "")
    domain = await directory.canonical_domain(domain_part)
    if domain is None:
        return LoginName(name, None, "")
    address = f"{local}@{domain}"
    account = await directory.get_account(address)
    if account is not None:
        return LoginName(name, account.address, domain, account)
    if rules.aliases_as_login:
        targets = await directory.resolve(address) or []
        local_targets = [found for t in targets if (found := await directory.get_account(t)) is not None]
        if len(local_targets) == 1:
            target = local_targets[0]
            return LoginName(name, target.address, target.domain, target)
    return LoginName(name, None, domain)


async def _resolve_bare(directory: Directory, redis: aioredis.Redis, name: str) -> LoginName:
    domains = await directory.list_domains()
    # One pipelined EXISTS per domain: one round trip however many domains there are.
    async with redis.pipeline(transaction=False) as pipe:
        for domain in domains:
            pipe.exists(keys.account(f"{name}@{domain}"))
        found = await pipe.execute()
    matches = [d for d, hit in zip(domains, found, strict=True) if hit]
    if len(matches) == 1:
        return LoginName(name, f"{name}@{matches[0]}", matches[0])
    return LoginName(name, None, "")
