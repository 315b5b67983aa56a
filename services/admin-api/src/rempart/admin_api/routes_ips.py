"""R-IPS-5: list, inspect and remove intrusion-prevention blocks.

The policy service owns blocking and writes these keys (``rempart.policy.intrusion``): the index
``IPS_BLOCKS`` is a sorted set (subject -> expiry) and each block a JSON record with its reason,
times, protocol, client IP and, for IPv6, the prefix it covers. The admin API reads and deletes
them through :mod:`rempart.common.keys`. Answers say why in words ("unknown recipients"), never
a requirement id, and give times as RFC 3339.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from rempart.admin_api.backend import AuditReady, Backend, BackendDep, SuperadminDep, invalid, not_found, record_change
from rempart.admin_api.models import MAX_LIST, IpBlock, IpBlockList, Problem
from rempart.common import keys

router = APIRouter(tags=["intrusion-prevention"], dependencies=[AuditReady])
_P = {"model": Problem}
IpPath = Annotated[str, Path(min_length=2, max_length=64)]
# "R-IPS-3 unknown recipients" -> "unknown recipients": SPEC ids are for the code, not for people.
REQUIREMENT_ID = re.compile(r"^\s*R-[A-Z0-9]+-\d+\b[\s:.-]*")
UNBLOCKED_BY_ADMIN = "unblocked by an administrator"
UNKNOWN_REASON = "intrusion prevention"


def reason_in_words(raw: str) -> str:
    return REQUIREMENT_ID.sub("", raw).strip() or UNKNOWN_REASON


def canonical_ip(raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise invalid("Not an IP address", "ip", "not an IP address", "path") from None


async def _index_members(backend: Backend, limit: int) -> tuple[list[str], bool]:
    members = await backend.redis.zrange(keys.IPS_BLOCKS, 0, limit)  # soonest expiry first
    names = [str(m) for m in members]
    return names[:limit], len(names) > limit


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
    )


@router.get("/v1/ips/blocks", operation_id="listIpBlocks", response_model=IpBlockList, responses={401: _P, 403: _P})
async def list_blocks(
    principal: SuperadminDep,
    backend: BackendDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = MAX_LIST,
) -> IpBlockList:
    members, truncated = await _index_members(backend, limit)
    blocks = [b for b in [await _block(backend, ip) for ip in members] if b is not None]
    return IpBlockList(blocks=blocks, truncated=truncated)


@router.get("/v1/ips/blocks/{ip}", operation_id="getIpBlock", response_model=IpBlock,
            responses={401: _P, 403: _P, 404: _P, 422: _P})
async def get_block(ip: IpPath, principal: SuperadminDep, backend: BackendDep) -> IpBlock:
    block = await _block(backend, canonical_ip(ip))
    if block is None:
        raise not_found("Block")
    return block


@router.delete("/v1/ips/blocks/{ip}", operation_id="deleteIpBlock", status_code=204, response_class=Response,
               responses={401: _P, 403: _P, 404: _P, 422: _P})
async def delete_block(ip: IpPath, request: Request, principal: SuperadminDep, backend: BackendDep) -> Response:
    ip = canonical_ip(ip)
    async with backend.redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.ips_block(ip))
        pipe.zrem(keys.IPS_BLOCKS, ip)
        removed = await pipe.execute()
    if not any(int(n) for n in removed):
        raise not_found("Block")
    await backend.events.publish("ips", "unblocked", client_ip=ip, account=principal.address,
                                 reason=UNBLOCKED_BY_ADMIN, actor=principal.address)
    await record_change(backend, request, principal.address, "ip_unblocked", ip, "ips")
    return Response(status_code=204)
