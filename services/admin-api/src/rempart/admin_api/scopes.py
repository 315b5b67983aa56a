"""Reading and writing one settings scope (``server``, ``domain:<name>``, ``account:<address>``).

Every write is one atomic read-modify-write of the scope's document (R-ADM-2): the If-Match
check, the merge or replace, keeping write-only secrets (R-ADM-3) and validation all see the
same stored document. The ETag is taken over the redacted document, so that it changes with a
secret without being an unkeyed hash of it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from rempart.admin_api.backend import Backend, ProblemError
from rempart.admin_api.models import FieldError
from rempart.admin_api.preconditions import check_if_match, etag_of
from rempart.admin_api.redaction import Redactor

Change = Callable[[dict[str, Any]], dict[str, Any]]


def settings_problem(exc: ValueError) -> ProblemError:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        fields = [FieldError(field=".".join(str(p) for p in e["loc"]), detail=str(e["msg"])) for e in errors()]
    else:
        # validate_scoped: "<section>: not settable at <scope> scope"
        section, _, why = str(exc).partition(": ")
        fields = [FieldError(field=section, detail=why or str(exc))]
    return ProblemError(422, "Invalid settings", fields[:50])


def scope_etag(redactor: Redactor, doc: dict[str, Any]) -> str:
    return etag_of(redactor.settings(doc))


async def read_scope(backend: Backend, redactor: Redactor, scope: str) -> tuple[int, dict[str, Any], str]:
    """The global version, the scope's stored overrides and their ETag."""
    version = await backend.store.version()
    doc = await backend.store.get_doc(scope)
    return version, doc, scope_etag(redactor, doc)


async def write_scope(
    backend: Backend, redactor: Redactor, scope: str, if_match: str | None, change: Change,
    before: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any], str]:
    """Apply ``change`` to the stored document if ``if_match`` still names it; the new version,
    document and ETag. ``before``, if given, receives the document the change was applied to
    (for the audit record)."""

    def checked(current: dict[str, Any]) -> dict[str, Any]:
        check_if_match(if_match, scope_etag(redactor, current))
        if before is not None:
            before.clear()
            before.update(copy.deepcopy(current))
        return change(current)

    try:
        version, doc = await backend.store.update_doc(scope, checked)
    except ValueError as exc:
        raise settings_problem(exc) from None
    return version, doc, scope_etag(redactor, doc)
