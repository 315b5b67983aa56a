"""R-IPS-5: list, inspect and remove intrusion-prevention blocks.

The policy service owns blocking and writes these keys; the admin API reads and deletes them
through :mod:`rempart.common.keys`. The index ``IPS_BLOCKS`` is read whatever its Redis type
(set, sorted set or hash) and the block key as a hash, a JSON object or a plain string, so that
this stays right while the policy service settles its format. When the policy service offers
``rempart.policy.intrusion.list_blocks`` / ``unblock``, these routes should call it instead.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from rempart.admin_api.backend import Backend, BackendDep, SuperadminDep, invalid, not_found, record_change
from rempart.admin_api.models import MAX_LIST, IpBlock, IpBlockList, Problem
from rempart.common import keys

router = APIRouter(tags=["intrusion-prevention"])
_P = {"model": Problem}
IpPath = Annotated[str, Path(min_length=2, max_length=64)]


def canonical_ip(raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise invalid("Not an IP address", "ip", "not an IP address", "path") from None


async def _index_members(backend: Backend, limit: int) -> tuple[list[str], bool]:
    kind = await backend.redis.type(keys.IPS_BLOCKS)
    if kind == "zset":
        members = await backend.redis.zrevrange(keys.IPS_BLOCKS, 0, limit)
    elif kind == "set":
        members = []
        async for member in backend.redis.sscan_iter(keys.IPS_BLOCKS, count=200):
            members.append(member)
            if len(members) > limit:
                break
    elif kind == "hash":
        members = []
        async for field, _ in backend.redis.hscan_iter(keys.IPS_BLOCKS, count=200):
            members.append(field)
            if len(members) > limit:
                break
    else:
        members = []
    names = [str(m) for m in members]
    return names[:limit], len(names) > limit


async def _block(backend: Backend, ip: str) -> IpBlock | None:
    key = keys.ips_block(ip)
    kind = await backend.redis.type(key)
    details: dict[str, str]
    if kind == "hash":
        details = {str(k): str(v) for k, v in (await backend.redis.hgetall(key)).items()}
    elif kind == "string":
        raw = await backend.redis.get(key)
        try:
            decoded: Any = json.loads(raw) if raw else None
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            details = {str(k): str(v) for k, v in decoded.items()}
        else:
            details = {"value": str(raw)} if raw else {}
    else:
        return None  # expired (the index may still name it until the policy service trims it)
    ttl = int(await backend.redis.ttl(key))
    return IpBlock(ip=ip, expires_in_seconds=ttl if ttl >= 0 else None, details=details)


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
    kind = await backend.redis.type(keys.IPS_BLOCKS)
    async with backend.redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.ips_block(ip))
        if kind == "zset":
            pipe.zrem(keys.IPS_BLOCKS, ip)
        elif kind == "set":
            pipe.srem(keys.IPS_BLOCKS, ip)
        elif kind == "hash":
            pipe.hdel(keys.IPS_BLOCKS, ip)
        removed = await pipe.execute()
    if not any(int(n) for n in removed):
        raise not_found("Block")
    await backend.events.publish("ips", "unblocked", client_ip=ip, account=principal.address, reason="R-IPS-5",
                                 actor=principal.address)
    await record_change(backend, request, principal.address, "ip_unblocked", ip, "ips")
    return Response(status_code=204)
