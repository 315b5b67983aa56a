"""The console acts through the API's own route functions, never a copy of what they do.

A console handler calls, say, :func:`rempart.admin_api.routes_directory.create_domain` with the
body model the API would have built from JSON, so validation, confinement (R-ADM-1), ETags
(R-ADM-2), the auth service calls, ending sessions and the audit record (R-ADM-5) are the same
code. Only FastAPI's dependency injection is bypassed, and with it the role check a route
declares on its ``principal`` parameter (``AdminDep``, ``SuperadminDep``): :func:`call` reads
that declaration and runs the very same check first, so the console cannot forget one.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from fastapi.params import Depends

from rempart.admin_api.backend import Principal, require_admin, require_superadmin

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


async def call(endpoint: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """``await endpoint(**kwargs)`` after the role check it declares (``principal=`` by name)."""
    check = declared_role_check(endpoint)
    if check is not None:
        principal = kwargs.get("principal")
        if not isinstance(principal, Principal):
            raise TypeError(f"{endpoint.__name__} needs principal= to check its role")
        await check(principal)
    return await endpoint(*args, **kwargs)
