"""The directory: local domains, accounts and aliases, kept in Redis.

The admin API is the only writer; policy, auth and imap-pop read. Addresses are stored in
lower case: local parts are treated case-insensitively, as every mainstream server does, so
that ``Bob@Example.org`` and ``bob@example.org`` are one mailbox (and one relay decision).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

import redis.asyncio as aioredis

from rempart.common import keys

Role = Literal["user", "domain_admin", "superadmin"]
MAX_ALIAS_DEPTH = 8


# Only an existing account's epoch moves: HINCRBY alone would make a stub record.
_BUMP_EPOCH = """
if redis.call('HEXISTS', KEYS[1], 'domain') == 1 then
  return redis.call('HINCRBY', KEYS[1], 'session_epoch', 1)
end
return false
"""


class DirectoryError(ValueError):
    """A write the directory refuses (unknown domain, duplicate, bad address)."""


def normalize_address(address: str) -> str:
    return address.strip().lower()


def split_address(address: str) -> tuple[str, str]:
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise DirectoryError(f"not an address: {address!r}")
    return local, domain


def valid_domain_name(name: str) -> bool:
    labels = name.split(".")
    return (
        0 < len(name) <= 253
        and len(labels) >= 2
        and all(
            0 < len(label) <= 63
            and label[0] != "-"
            and label[-1] != "-"
            and all(c.isalnum() or c == "-" for c in label)
            for label in labels
        )
    )


@dataclass(frozen=True)
class Account:
    address: str
    domain: str
    role: Role = "user"
    display_name: str = ""
    enabled: bool = True
    created: float = 0.0
    aliases: list[str] = field(default_factory=list)
    # Admin API sessions carry the epoch they were made in; a bump ends every older one (R-ADM-4).
    session_epoch: int = 0


class Directory:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    # Domains ---------------------------------------------------------------------------------
    async def add_domain(self, name: str, description: str = "") -> None:
        name = normalize_address(name)
        if not valid_domain_name(name):
            raise DirectoryError(f"not a domain name: {name!r}")
        added = await self._redis.sadd(keys.DOMAINS, name)
        if not added:
            raise DirectoryError(f"domain exists: {name}")
        await self._redis.hset(
            keys.domain(name), mapping={"description": description, "created": str(time.time())}
        )

    async def delete_domain(self, name: str) -> None:
        name = normalize_address(name)
        if await self._redis.scard(keys.domain_accounts(name)):
            raise DirectoryError(f"domain {name} still has accounts")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(keys.DOMAINS, name)
            pipe.delete(keys.domain(name))
            # Its DKIM keys go with it: a domain made again later under the name gets new ones.
            pipe.delete(keys.dkim_keys(name))
            pipe.incr(keys.DKIM_VERSION)
            await pipe.execute()

    async def list_domains(self) -> list[str]:
        return sorted(str(m) for m in await self._redis.smembers(keys.DOMAINS))

    async def is_local_domain(self, name: str) -> bool:
        name = normalize_address(name)
        if await self._redis.sismember(keys.DOMAINS, name):
            return True
        return bool(await self._redis.exists(keys.domain_alias(name)))

    async def add_domain_alias(self, alias_name: str, target: str) -> None:
        alias_name, target = normalize_address(alias_name), normalize_address(target)
        if not await self._redis.sismember(keys.DOMAINS, target):
            raise DirectoryError(f"unknown domain: {target}")
        await self._redis.set(keys.domain_alias(alias_name), target)

    async def delete_domain_alias(self, alias_name: str) -> bool:
        return bool(await self._redis.delete(keys.domain_alias(normalize_address(alias_name))))

    async def domain_aliases(self) -> dict[str, str]:
        """Every domain alias and the domain it stands for (a SCAN: there is no index)."""
        prefix = keys.domain_alias("")
        names = [str(k) async for k in self._redis.scan_iter(match=keys.domain_alias("*"), count=500)]
        targets = await self._redis.mget(names) if names else []
        return {n.removeprefix(prefix): str(t) for n, t in zip(names, targets, strict=True) if t is not None}

    async def canonical_domain(self, name: str) -> str | None:
        name = normalize_address(name)
        if await self._redis.sismember(keys.DOMAINS, name):
            return name
        target = await self._redis.get(keys.domain_alias(name))
        return str(target) if target else None

    # Accounts --------------------------------------------------------------------------------
    async def add_account(self, address: str, role: Role = "user", display_name: str = "") -> Account:
        address = normalize_address(address)
        _, domain = split_address(address)
        if not await self._redis.sismember(keys.DOMAINS, domain):
            raise DirectoryError(f"unknown domain: {domain}")
        created = time.time()
        ok = await self._redis.hsetnx(keys.account(address), "address", address)
        if not ok:
            raise DirectoryError(f"account exists: {address}")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                keys.account(address),
                mapping={
                    "domain": domain,
                    "role": role,
                    "display_name": display_name,
                    "enabled": "1",
                    "created": str(created),
                },
            )
            pipe.sadd(keys.domain_accounts(domain), address)
            await pipe.execute()
        return Account(address, domain, role, display_name, True, created)

    async def get_account(self, address: str) -> Account | None:
        raw = await self._redis.hgetall(keys.account(normalize_address(address)))
        if not raw or "domain" not in raw:
            return None
        data = {str(k): str(v) for k, v in raw.items()}
        aliases = json.loads(data.get("aliases", "[]"))
        role = data.get("role", "user")
        return Account(
            address=data["address"],
            domain=data["domain"],
            role=role if role in ("user", "domain_admin", "superadmin") else "user",  # type: ignore[arg-type]
            display_name=data.get("display_name", ""),
            enabled=data.get("enabled", "1") == "1",
            created=float(data.get("created", "0")),
            aliases=aliases,
            session_epoch=int(data.get("session_epoch", "0") or 0),
        )

    async def end_sessions(self, address: str) -> int | None:
        """Bump the account's session epoch (every session made before is over); None when there
        is no such account (nothing is written then)."""
        epoch = await self._redis.eval(_BUMP_EPOCH, 1, keys.account(normalize_address(address)))
        return None if epoch is None else int(epoch)

    async def set_account_enabled(self, address: str, enabled: bool) -> None:
        await self._redis.hset(keys.account(normalize_address(address)), "enabled", "1" if enabled else "0")

    async def delete_account(self, address: str) -> None:
        address = normalize_address(address)
        account = await self.get_account(address)
        if account is None:
            raise DirectoryError(f"unknown account: {address}")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.account(address), keys.credentials(address))
            pipe.srem(keys.domain_accounts(account.domain), address)
            for alias_address in account.aliases:
                pipe.delete(keys.alias(alias_address))
            await pipe.execute()

    async def list_accounts(self, domain: str) -> list[str]:
        members = await self._redis.smembers(keys.domain_accounts(normalize_address(domain)))
        return sorted(str(m) for m in members)

    # Aliases (R-DOM-2) -----------------------------------------------------------------------
    async def add_alias(self, alias_address: str, targets: list[str]) -> None:
        alias_address = normalize_address(alias_address)
        _, domain = split_address(alias_address)
        if not await self._redis.sismember(keys.DOMAINS, domain):
            raise DirectoryError(f"unknown domain: {domain}")
        if await self._redis.exists(keys.account(alias_address)):
            raise DirectoryError(f"an account has this address: {alias_address}")
        clean = [normalize_address(t) for t in targets]
        for target in clean:
            split_address(target)
        await self._redis.set(keys.alias(alias_address), json.dumps(clean))
        for target in clean:
            account = await self.get_account(target)
            if account is not None and alias_address not in account.aliases:
                await self._redis.hset(
                    keys.account(target), "aliases", json.dumps([*account.aliases, alias_address])
                )

    async def set_alias_targets(self, alias_address: str, targets: list[str]) -> None:
        """Replace an existing alias's targets, keeping the accounts' ``aliases`` lists in step."""
        alias_address = normalize_address(alias_address)
        old = await self.alias_targets(alias_address)
        if old is None:
            raise DirectoryError(f"unknown alias: {alias_address}")
        clean = [normalize_address(t) for t in targets]
        for target in clean:
            split_address(target)
        await self._redis.set(keys.alias(alias_address), json.dumps(clean))
        for target in set(old) - set(clean):
            await self._forget_alias(target, alias_address)
        for target in clean:
            account = await self.get_account(target)
            if account is not None and alias_address not in account.aliases:
                await self._redis.hset(
                    keys.account(target), "aliases", json.dumps([*account.aliases, alias_address])
                )

    async def delete_alias(self, alias_address: str) -> list[str] | None:
        """Remove an alias; returns its targets, or None when there was no such alias."""
        alias_address = normalize_address(alias_address)
        targets = await self.alias_targets(alias_address)
        if targets is None:
            return None
        await self._redis.delete(keys.alias(alias_address))
        for target in targets:
            await self._forget_alias(target, alias_address)
        return targets

    async def _forget_alias(self, target: str, alias_address: str) -> None:
        account = await self.get_account(target)
        if account is not None and alias_address in account.aliases:
            remaining = [a for a in account.aliases if a != alias_address]
            await self._redis.hset(keys.account(account.address), "aliases", json.dumps(remaining))

    async def list_aliases(self, domain: str) -> list[str]:
        """The alias addresses of ``domain`` (a SCAN: the directory keeps no alias index)."""
        pattern = keys.alias("*@" + normalize_address(domain))
        found = [str(k).removeprefix(keys.alias("")) async for k in self._redis.scan_iter(match=pattern, count=500)]
        return sorted(found)

    async def alias_targets(self, alias_address: str) -> list[str] | None:
        raw = await self._redis.get(keys.alias(normalize_address(alias_address)))
        if raw is None:
            return None
        targets = json.loads(raw)
        return [str(t) for t in targets]

    async def resolve(self, address: str) -> list[str] | None:
        """Expand aliases and domain aliases: the final addresses, or None when nothing matches.

        Results may include remote addresses (an alias that forwards off-site); the caller
        decides whether each is local with :meth:`get_account`.
        """
        address = normalize_address(address)
        seen: set[str] = set()
        out: list[str] = []
        found = await self._resolve_into(address, seen, out, 0)
        return out if found else None

    async def _resolve_into(self, address: str, seen: set[str], out: list[str], depth: int) -> bool:
        if address in seen or depth > MAX_ALIAS_DEPTH:
            return True
        seen.add(address)
        local, _, domain = address.rpartition("@")
        canonical = await self.canonical_domain(domain)
        if canonical is None:
            out.append(address)  # remote target of an alias
            return True
        address = f"{local}@{canonical}"
        if await self._redis.exists(keys.account(address)):
            out.append(address)
            return True
        targets = await self.alias_targets(address)
        if targets is None:
            return False
        for target in targets:
            await self._resolve_into(target, seen, out, depth + 1)
        return True
