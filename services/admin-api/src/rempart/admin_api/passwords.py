"""Password changes go through the auth service, which owns hashing and the R-PWD-1 policy."""

from __future__ import annotations

import logging

import grpc
from fastapi import Request

from rempart.admin_api.backend import Backend, ProblemError
from rempart.admin_api.models import FieldError
from rempart.common.pb.auth.v1 import auth_pb2

log = logging.getLogger(__name__)

AUTH_UNAVAILABLE = "Authentication service unavailable, try again later"
POLICY_REFUSED = "Password refused by the password policy"


def auth_unavailable() -> ProblemError:
    return ProblemError(503, AUTH_UNAVAILABLE, headers={"Retry-After": "5"})


async def set_password(backend: Backend, account: str, password: str, field: str = "password") -> None:
    """Set ``account``'s password under the policy; 422 naming every violated rule (R-PWD-1) on
    ``field``, the body field that carried the password."""
    try:
        reply = await backend.auth.set_password(account, password, skip_policy=False)
    except grpc.aio.AioRpcError as exc:
        log.warning("SetPassword failed: %s", exc.code().name, extra={"account": account})
        raise auth_unavailable() from None
    if reply.violations or not reply.ok:
        rules = list(reply.violations) or ["password refused"]
        raise ProblemError(422, POLICY_REFUSED, [FieldError(field=field, detail=rule) for rule in rules])


def request_tls(request: Request) -> bool:
    # What this process saw; TLS terminated by an ingress in front of it shows as http.
    return request.url.scheme == "https"


async def check_password(
    backend: Backend, account: str, password: str, ip: str, tls: bool
) -> auth_pb2.AuthStatus.ValueType:
    reply = await backend.auth.authenticate(
        auth_pb2.AuthenticateRequest(
            login=account, password=password, client_ip=ip, protocol="admin", mechanism="password", tls=tls
        )
    )
    return reply.status
