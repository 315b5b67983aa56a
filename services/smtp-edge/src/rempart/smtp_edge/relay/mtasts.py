"""MTA-STS (RFC 8461): a destination that publishes a policy gets its mail over verified TLS.

Discovery and fetch (RFC 8461 3): the TXT record ``_mta-sts.<domain>`` (``v=STSv1; id=...``),
looked up through the relay's resolvers, announces a policy; the policy itself is fetched from
``https://mta-sts.<domain>/.well-known/mta-sts.txt``, the host name resolved through the same
resolvers, its certificate verified for that name (system trust store plus
``REMPART_TLS_CA_FILE``), no redirect followed (3.3), and cached in Redis for its ``max_age``,
shared by every replica.

Which policy applies (5.1): a cached, unexpired policy whose id the TXT record still names is
used as it is; a changed id is fetched again; a TXT record that is gone or a DNS failure leaves
the cached policy in force (removing the TXT record is not a way to downgrade a domain, 8.3);
a fetch that fails keeps the cached policy, and with none cached the domain is treated as
having no policy (3.3), the failure remembered for a few minutes so that a dead policy host
does not cost a timeout per message.

What a policy does (5): ``enforce``: only MX hosts that match an ``mx:`` pattern, only over TLS
1.2 or later with a certificate valid for the MX name; anything else is a temporary failure,
retried, never a plain or unverified delivery. ``testing``: delivery as usual, each departure
from the policy logged. ``none``: nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import httpx
import redis.asyncio as aioredis

from rempart.common import keys
from rempart.smtp_edge.relay.replies import Reply
from rempart.smtp_edge.relay.routing import Router

log = logging.getLogger(__name__)

Mode = Literal["enforce", "testing", "none"]
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: at most one year
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3: policies are small; refuse anything large
FAILURE_MEMORY_SECONDS = 300.0
MEMO_SECONDS = 5.0
WELL_KNOWN = "/.well-known/mta-sts.txt"


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class StsPolicy:
    id: str
    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    fetched_unix: float = 0.0

    def matches(self, host: str) -> bool:
        """RFC 8461 4.1: an exact name, or ``*.`` standing for exactly one leftmost label."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if label and dot and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str) -> StsPolicy:
        data = json.loads(raw)
        return cls(str(data["id"]), data["mode"], tuple(data["mx"]), int(data["max_age"]),
                   float(data.get("fetched_unix", 0.0)))


def txt_policy_id(records: list[str]) -> str | None:
    """The id announced by ``_mta-sts`` TXT records (RFC 8461 3.1); None for no (usable) record:
    records not starting with ``v=STSv1`` are ignored, and more than one that does counts as none."""
    ours = [r for r in records if r.replace(" ", "").startswith("v=STSv1")]
    if len(ours) != 1:
        return None
    fields = dict(
        (name.strip(), value.strip())
        for name, _, value in (part.partition("=") for part in ours[0].split(";") if part.strip())
    )
    policy_id = fields.get("id", "")
    if fields.get("v") != "STSv1" or not (1 <= len(policy_id) <= 32) or not policy_id.isalnum():
        return None
    return policy_id


def parse_policy(text: str, policy_id: str, now: float) -> StsPolicy:
    """RFC 8461 3.2: ``key: value`` lines; ``mx`` repeats; unknown keys are ignored."""
    values: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"not a 'key: value' line: {line[:60]!r}")
        name, value = name.strip(), value.strip()
        if name == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            values.setdefault(name, value)
    if values.get("version") != "STSv1":
        raise PolicyError("version is not STSv1")
    mode = values.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"unknown mode {mode[:20]!r}")
    max_age_text = values.get("max_age", "")
    if not max_age_text.isdigit() or len(max_age_text) > 10 or int(max_age_text) > MAX_AGE_LIMIT:
        raise PolicyError("max_age missing or out of range")
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")
    return StsPolicy(policy_id, mode, tuple(mx), int(max_age_text), now)  # type: ignore[arg-type]


def enforce_failed(domain: str, why: str) -> Reply:
    """A temporary failure: the message waits, and is retried, rather than leave unprotected."""
    return Reply(451, "4.7.5", f"MTA-STS policy of {domain}: {why}"[:400])


@dataclass
class MtaSts:
    redis: aioredis.Redis
    router: Router
    ca_file: str = ""
    port: int = 443
    timeout: float = 10.0
    clock: Callable[[], float] = time.time
    memo_seconds: float = MEMO_SECONDS
    _client: httpx.AsyncClient | None = field(default=None, init=False)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict, init=False)
    _failures: dict[tuple[str, str], float] = field(default_factory=dict, init=False)
    # The policy kept in Redis, as read a moment ago: a message costs no Redis round trip for it.
    _memo: dict[str, tuple[float, StsPolicy | None]] = field(default_factory=dict, init=False)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
            if self.ca_file:
                ctx.load_verify_locations(cafile=self.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._client = httpx.AsyncClient(verify=ctx, trust_env=False, follow_redirects=False,
                                             timeout=self.timeout)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def cached(self, domain: str, recent: bool = False) -> StsPolicy | None:
        """The policy kept in Redis for ``domain`` (shared by the replicas); ``recent``: as read
        within the last ``memo_seconds``, which is enough to see that the TXT record's id is the same."""
        now = time.monotonic()
        if recent:
            memo = self._memo.get(domain)
            if memo is not None and memo[0] > now:
                return memo[1]
        raw = await self.redis.get(keys.mta_sts_policy(domain))
        policy: StsPolicy | None = None
        if raw is not None:
            try:
                policy = StsPolicy.from_json(str(raw))
            except (ValueError, KeyError, TypeError):
                policy = None
        if len(self._memo) > 10_000:
            self._memo = {d: m for d, m in self._memo.items() if m[0] > now}
        self._memo[domain] = (now + self.memo_seconds, policy)
        return policy

    async def policy(self, domain: str) -> StsPolicy | None:
        """The policy to apply to mail for ``domain`` now (see the module's notes)."""
        domain = domain.lower().rstrip(".")
        cached = await self.cached(domain, recent=True)
        records = await self.router.txt(f"_mta-sts.{domain}")
        policy_id = txt_policy_id(records) if records is not None else None
        if policy_id is None or (cached is not None and cached.id == policy_id):
            return cached
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:
            again = await self.cached(domain)
            if again is not None and again.id == policy_id:
                return again  # another task (or replica) fetched it meanwhile
            memo = self._failures.get((domain, policy_id))
            if memo is not None and memo > time.monotonic():
                return cached
            try:
                fetched = await self._fetch(domain, policy_id)
            except (PolicyError, httpx.HTTPError, ssl.SSLError, OSError) as exc:
                self._remember_failure(domain, policy_id)
                log.warning("MTA-STS policy of %s could not be fetched: %s", domain, exc or type(exc).__name__,
                            extra={"domain": domain, "policy_id": policy_id,
                                   "kept": cached.id if cached is not None else ""})
                return cached
            if fetched.max_age > 0:
                await self.redis.set(keys.mta_sts_policy(domain), fetched.to_json(), ex=fetched.max_age)
            else:
                await self.redis.delete(keys.mta_sts_policy(domain))
            self._memo.pop(domain, None)
        if len(self._locks) > 10_000:
            self._locks = {d: held for d, held in self._locks.items() if held.locked()}
        log.info("MTA-STS policy of %s: mode %s, mx %s, max_age %d", domain, fetched.mode, ",".join(fetched.mx),
                 fetched.max_age, extra={"domain": domain, "policy_id": policy_id})
        return fetched

    def _remember_failure(self, domain: str, policy_id: str) -> None:
        now = time.monotonic()
        if len(self._failures) > 10_000:
            self._failures = {k: t for k, t in self._failures.items() if t > now}
        self._failures[(domain, policy_id)] = now + FAILURE_MEMORY_SECONDS

    async def _fetch(self, domain: str, policy_id: str) -> StsPolicy:
        host = f"mta-sts.{domain}"
        try:
            addresses = await self.router.addresses(host)
        except Exception as exc:  # noqa: BLE001 - RouteError: DNS did not answer
            raise PolicyError(f"{host}: {exc}") from None
        if not addresses:
            raise PolicyError(f"{host} has no address")
        last: Exception = PolicyError(f"{host}: no address answered")
        for address in addresses:
            literal = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
            url = f"https://{literal}:{self.port}{WELL_KNOWN}"
            headers = {"Host": host if self.port == 443 else f"{host}:{self.port}", "Accept": "text/plain"}
            try:
                # Connect to the address our resolvers gave; TLS still names (SNI) and verifies
                # the policy host (RFC 8461 3.3, RFC 6125).
                async with self._http().stream("GET", url, headers=headers,
                                               extensions={"sni_hostname": host}) as response:
                    if response.status_code != 200:
                        raise PolicyError(f"{host} answered HTTP {response.status_code}")
                    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    if media_type != "text/plain":
                        raise PolicyError(f"{host} served {media_type or 'no content type'}, not text/plain")
                    body = b""
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_POLICY_BYTES:
                            raise PolicyError(f"{host}: policy larger than {MAX_POLICY_BYTES} bytes")
            except (httpx.ConnectError, httpx.TimeoutException, OSError) as exc:
                last = exc
                continue
            return parse_policy(body.decode("utf-8", "replace"), policy_id, self.clock())
        raise last
