"""The console acts through the API's own route functions, never a copy of what they do.

A console handler calls, say, :func:`rempart.admin_api.routes_directory.create_domain` with the
body model the API would have built from JSON, so validation, confinement (R-ADM-1), ETags
(R-ADM-2), the auth service calls, ending sessions and the audit record (R-ADM-5) are the same
code. Only FastAPI's dependency injection is bypassed, and with it the role check a route
declares on its ``principal`` parameter (``AdminDep``, ``SuperadminDep``): :func:`call` reads
that declaration and runs the very same check first, so the console cannot forget one. The
other dependency bypassed is ``audit_ready`` (R-ADM-5, fail closed): for a write route that
declares it, :func:`call` asks the audit stream first, as the API does, so that a console write
while JetStream is down changes nothing and is answered with the console's 503 page.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from fastapi.params import Depends
from fastapi.routing import APIRoute

from rempart.admin_api.backend import READS, Backend, Principal, audit_ready, require_admin, require_superadmin

P = ParamSpec("P")
T = TypeVar("T")
RoleCheck = Callable[[Principal], Awaitable[Principal]]
ROLE_CHECKS: tuple[RoleCheck, ...] = (require_admin, require_superadmin)


@functools.cache
def declared_role_check(endpoint: Callable[..., object]) -> RoleCheck | None:
    """The role dependency ``endpoint`` declares on ``principal`` (None: any signed-in caller)."""
    hints = typing.get_type_hints(endpoint, include_extras=True)
    for meta in getattr(hints.get("principal"), "__metadata__", ()):
        if isinstance(meta, Depends) and meta.dependency in ROLE_CHECKS:
            check: RoleCheck = meta.dependency
            return check
    return None


@functools.cache
def audited_write(endpoint: Callable[..., object]) -> bool:
    """Whether ``endpoint`` is an API write route that depends on ``audit_ready``: a method other
    than GET/HEAD/OPTIONS, the dependency on the route or its router (read from the route as the
    endpoint's module's ``router`` declares it)."""
    router = getattr(inspect.getmodule(endpoint), "router", None)
    for route in getattr(router, "routes", ()):
        if isinstance(route, APIRoute) and route.endpoint is endpoint:
            writes = bool((route.methods or set()) - set(READS))
            return writes and any(dep.dependency is audit_ready for dep in route.dependencies)
    return False


async def call(endpoint: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """``await endpoint(**kwargs)`` after the role check it declares (``principal=`` by name)
    and, for an audited write, the audit stream's readiness (``backend=`` by name): without it
    :class:`rempart.common.audit.AuditUnavailable` is raised before anything changes."""
    check = declared_role_check(endpoint)
    if check is not None:
        principal = kwargs.get("principal")
        if not isinstance(principal, Principal):
            raise TypeError(f"{endpoint.__name__} needs principal= to check its role")
        await check(principal)
    if audited_write(endpoint):
        backend = kwargs.get("backend")
        if not isinstance(backend, Backend):
            raise TypeError(f"{endpoint.__name__} needs backend= to check the audit stream")
        await backend.audit.ready()
    return await endpoint(*args, **kwargs)
