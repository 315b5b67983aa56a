"""R-ADM-2: no lost updates. ETag on every writable resource, If-Match on every write to it.

The ETag is a strong validator: a digest of what the resource holds (a settings scope: its
stored overrides; an account, alias or domain: the representation the caller is shown). A write
with ``If-Match`` whose tag is not the current one is refused with ``412`` and changes nothing;
``If-Match: *`` only asks that the resource exist.

``If-Match`` is optional (no ``428``): existing scripts and the e2e suite write without it, and
a PATCH of the settings is a deep merge done atomically on the server, so it loses nothing even
without a tag. A client that edits what it read (a full PUT, rempartctl's ``settings set``) sends
the tag it read. Settings and account writes check the tag atomically (Redis WATCH); alias and
domain writes check it just before writing (one Redis round trip apart).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import Header, Response
from pydantic import BaseModel

from rempart.admin_api.backend import ProblemError

IfMatchHeader = Annotated[
    str | None,
    Header(alias="If-Match", max_length=1024,
           description="The ETag of the version you edited; 412 if the resource changed since."),
]
STALE = "The resource changed since you read it: read it again (new ETag) and redo your change"
ETAG_HEX = 24


def etag_of(state: BaseModel | dict[str, Any] | list[Any]) -> str:
    data = state.model_dump(mode="json") if isinstance(state, BaseModel) else state
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f'"{digest[:ETAG_HEX]}"'


def check_if_match(if_match: str | None, current: str | None) -> None:
    """RFC 9110 13.1.1: strong comparison; ``current`` None means the resource does not exist."""
    if if_match is None:
        return
    tags = [t.strip() for t in if_match.split(",")]
    if current is not None and ("*" in tags or current in tags):
        return
    raise ProblemError(412, STALE, headers={"ETag": current} if current else None)


def with_etag(response: Response, tag: str) -> None:
    response.headers["ETag"] = tag
