"""R-IPS-5: list, inspect, add by hand and remove intrusion-prevention blocks.

The policy service owns blocking and writes these keys (``rempart.policy.intrusion``): the index
``IPS_BLOCKS`` is a sorted set (subject -> expiry) and each block a JSON record with its reason,
times, protocol, client IP and, for IPv6, the prefix it covers. A block's subject, its record
and its lifting are the policy's own, from :mod:`rempart.common.ipblocks`, so that a block made
here is the one the policy enforces and an address unblocked here finds its block. Answers say
why in words ("unknown recipients"), never a requirement id, and give times as RFC 3339.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from rempart.admin_api.backend import (
    AuditReady,
    Backend,
    BackendDep,
    ProblemError,
    SuperadminDep,
    invalid,
    not_found,
    record_action,
)
from rempart.admin_api.models import MAX_LIST, MAX_TEXT, IpBlock, IpBlockCreate, IpBlockList, Problem
from rempart.admin_api.paging import CursorQuery, decode_score_cursor, encode_cursor
from rempart.common import keys
from rempart.common.config import MailSettings, deep_merge
from rempart.common.ipblocks import block_document, intrusion_subject, never_blocked, unblock

router = APIRouter(tags=["intrusion-prevention"], dependencies=[AuditReady])
_P = {"model": Problem}
IpPath = Annotated[str, Path(min_length=2, max_length=64)]
# "R-IPS-3 unknown recipients" -> "unknown recipients": SPEC ids are for the code, not for people.
REQUIREMENT_ID = re.compile(r"^\s*R-[A-Z0-9]+-\d+\b[\s:.-]*")
UNBLOCKED_BY_ADMIN = "unblocked by an administrator"
UNKNOWN_REASON = "intrusion prevention"
SCAN_BUDGET = 5000
BATCH = 200


def reason_in_words(raw: str) -> str:
    return REQUIREMENT_ID.sub("", raw).strip() or UNKNOWN_REASON


def canonical_ip(raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise invalid("Not an IP address", "ip", "not an IP address", "path") from None


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


async def _block(backend: Backend, ip: str) -> IpBlock | None:
    key = keys.ips_block(ip)
    raw = await backend.redis.get(key)
    if raw is None:
        return None  # expired (the index may still name it until the policy service trims it)
    try:
        decoded: Any = json.loads(raw)
    except ValueError:
        decoded = None
    record: dict[str, Any] = decoded if isinstance(decoded, dict) else {}
    ttl = int(await backend.redis.ttl(key))
    expires_at = _number(record.get("expires_at"))
    return IpBlock(
        ip=ip,
        reason=reason_in_words(str(record.get("reason", ""))),
        blocked_at=_number(record.get("blocked_at")),
        expires_at=expires_at if expires_at is not None else (time.time() + ttl if ttl >= 0 else None),
        expires_in_seconds=ttl if ttl >= 0 else None,
        prefix=str(record.get("prefix", "")),
        client_ip=str(record.get("client_ip", "")),
        protocol=str(record.get("protocol", "")),
        blocked_by=str(record.get("blocked_by", "")),
    )


@router.get("/v1/ips/blocks", operation_id="listIpBlocks", response_model=IpBlockList, responses={401: _P, 403: _P})
async def list_blocks(
    principal: SuperadminDep,
    backend: BackendDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = MAX_LIST,
    cursor: CursorQuery = None,
    reason: Annotated[str | None, Query(max_length=MAX_TEXT, description="Only blocks whose reason contains this")]
    = None,
) -> IpBlockList:
    """Soonest expiry first. ``truncated`` says the same as a non-null ``next_cursor``."""
    after = decode_score_cursor("ip-blocks", cursor)
    low: float | str = "-inf" if after is None else after[0]
    wanted = reason.strip().lower() if reason else ""
    out: list[IpBlock] = []
    offset = scanned = 0
    last: tuple[float, str] | None = None
    more = False
    while scanned < SCAN_BUDGET and not more:
        raw: list[Any] = list(await backend.redis.zrangebyscore(keys.IPS_BLOCKS, low, "+inf", start=offset,
                                                                num=BATCH, withscores=True))
        if not raw:
            break
        offset += len(raw)
        for member, score in ((str(m), float(sc)) for m, sc in raw):
            if after is not None and (score, member) <= after:
                continue
            if len(out) == limit:
                more = True
                break
            scanned += 1
            block = await _block(backend, member)
            last = (score, member)
            if block is not None and wanted in block.reason.lower():
                out.append(block)
        if scanned >= SCAN_BUDGET:
            more = True
    next_cursor = encode_cursor("ip-blocks", f"{last[0]!r} {last[1]}") if more and last is not None else None
    return IpBlockList(blocks=out, truncated=next_cursor is not None, next_cursor=next_cursor)


@router.get("/v1/ips/blocks/{ip}", operation_id="getIpBlock", response_model=IpBlock,
            responses={401: _P, 403: _P, 404: _P, 422: _P})
async def get_block(ip: IpPath, principal: SuperadminDep, backend: BackendDep) -> IpBlock:
    block = await _block(backend, await _subject_of_path(backend, ip))
    if block is None:
        raise not_found("Block")
    return block


async def _server_settings(backend: Backend) -> MailSettings:
    return MailSettings.model_validate(deep_merge(MailSettings().model_dump(), await backend.store.get_doc("server")))


def block_subject(raw: str, ipv6_prefix_length: int) -> tuple[str, str, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """(subject, prefix, address) of a block asked for ``raw``: the policy's own subject of the
    address (:func:`rempart.common.ipblocks.intrusion_subject`: an IPv4 address alone, also when
    IPv4-mapped; an IPv6 address by the ``ips.ipv6_prefix_length`` prefix that holds it). A wider
    network is refused: the policy looks a client up by that one subject, so a wider block would
    be shown here and enforced nowhere."""
    text = raw.strip()
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise invalid("Not an IP address or network", "ip", "not an IP address or network (CIDR)") from None
    address = network.network_address
    mapped = isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
    if mapped and network.num_addresses > 1:
        raise invalid("Only single IPv4 addresses are blocked", "ip",
                      "an IPv4-mapped network is not enforced by intrusion prevention: block its addresses one by one")
    if isinstance(network, ipaddress.IPv4Network) and network.prefixlen != 32:
        raise invalid("Only single IPv4 addresses are blocked", "ip",
                      "an IPv4 network wider than /32 is not enforced by intrusion prevention: block its "
                      "addresses one by one")
    if isinstance(network, ipaddress.IPv6Network) and not mapped and network.prefixlen < ipv6_prefix_length:
        raise invalid("The network is wider than intrusion prevention blocks", "ip",
                      f"an IPv6 network wider than /{ipv6_prefix_length} (ips.ipv6_prefix_length) is not enforced")
    subject, prefix = intrusion_subject(address, ipv6_prefix_length)
    return subject, prefix, address


async def _subject_of_path(backend: Backend, raw: str) -> str:
    """The block ``/v1/ips/blocks/{ip}`` names: the subject as listed (``2001:db8:1:2::``), or any
    address the block covers (``2001:db8:1:2::5``, ``::ffff:192.0.2.9``), mapped the way
    ``POST`` and the policy map it."""
    address = canonical_ip(raw)
    if await backend.redis.exists(keys.ips_block(address)):
        return address  # as listed (also a subject named under an older ips.ipv6_prefix_length)
    settings = await _server_settings(backend)
    return intrusion_subject(ipaddress.ip_address(address), settings.ips.ipv6_prefix_length)[0]


@router.post("/v1/ips/blocks", operation_id="createIpBlock", response_model=IpBlock, status_code=201,
             responses={401: _P, 403: _P, 409: _P, 422: _P, 503: _P},
             summary="Block an IP (or an IPv6 prefix) by hand, as intrusion prevention does")
async def create_block(body: IpBlockCreate, request: Request, principal: SuperadminDep,
                       backend: BackendDep) -> IpBlock:
    """The same block the policy service makes (R-IPS-4): the edges refuse the address at its next
    connection, and, when ``ips.close_all_connections`` is on, close the ones it has open. An
    IPv6 address blocks its whole prefix (``ips.ipv6_prefix_length``, /64 by default), the way
    the policy counts IPv6 clients (R-IPS-6); the answer's ``prefix`` names it. A block already
    in force is replaced (the new reason and duration)."""
    settings = await _server_settings(backend)
    subject, prefix, address = block_subject(body.ip, settings.ips.ipv6_prefix_length)
    if never_blocked(address, settings):
        # The policy never counts nor refuses these (R-IPS-5): the block would be shown, not enforced.
        raise invalid("The address is whitelisted or a trusted host", "ip",
                      "ips.whitelist or relay.trusted_hosts holds it: intrusion prevention never blocks it")
    if not settings.ips.refuse_blocked:
        raise ProblemError(409, "Blocked addresses are not refused (ips.refuse_blocked is off): turn it on first")
    before = await _block(backend, subject)
    now = time.time()
    seconds = body.duration_minutes * 60
    doc = block_document(reason=body.reason, blocked_at=now, expires_at=now + seconds, client_ip=body.ip.strip(),
                         prefix=prefix, blocked_by=principal.address)
    async with backend.redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.ips_block(subject), doc, ex=seconds)
        pipe.zadd(keys.IPS_BLOCKS, {subject: now + seconds})
        await pipe.execute()
    block = await _block(backend, subject)
    if block is None:
        raise not_found("Block")  # expired in the same instant: only with a clock gone mad
    await record_action(backend, request, principal.address, "ip_blocked", subject, kind="ip_block",
                        before=before, after=block)
    # The edges close the address's open connections on this, as for the policy's own blocks.
    await backend.events.publish(
        "ips", "blocked", client_ip=subject, account=principal.address, reason=body.reason,
        minutes=str(body.duration_minutes), close_all_connections=str(settings.ips.close_all_connections).lower(),
        instance="", prefix=prefix, actor=principal.address)
    return block


@router.delete("/v1/ips/blocks/{ip}", operation_id="deleteIpBlock", status_code=204, response_class=Response,
               responses={401: _P, 403: _P, 404: _P, 422: _P, 503: _P})
async def delete_block(ip: IpPath, request: Request, principal: SuperadminDep, backend: BackendDep) -> Response:
    """Lift the block and forget the address's intrusion counters (connections, failed logins,
    unknown recipients, relay denials, RSETs, open sessions), as the policy service's own unblock
    does: otherwise the next connection would count on from where the block began and block the
    address again at once. A known-IP record (R-IPS-6) stays. ``{ip}`` is the block as listed or
    any address it covers: ``2001:db8:1:2::5`` lifts the block of ``2001:db8:1:2::/64``."""
    ip = await _subject_of_path(backend, ip)
    before = await _block(backend, ip)
    if not await unblock(backend.redis, ip):
        raise not_found("Block")
    await record_action(backend, request, principal.address, "ip_unblocked", ip, kind="ip_block", before=before)
    await backend.events.publish("ips", "unblocked", client_ip=ip, account=principal.address,
                                 reason=UNBLOCKED_BY_ADMIN, actor=principal.address)
    return Response(status_code=204)
