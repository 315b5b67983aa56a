"""``GET /v1/stats``: what the suite accepted, refused and let log in, per time bucket.

The counts are :mod:`rempart.common.stats`: every replica of the SMTP edge, the policy service
and the auth service adds to per-minute and per-hour Redis counters where it decides, and this
route sums the buckets of the range asked. Superadmins only: the counts cover every domain.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from rempart.admin_api.backend import BackendDep, SuperadminDep, invalid
from rempart.admin_api.models import Problem
from rempart.common import stats

router = APIRouter(tags=["statistics"])
_P = {"model": Problem}
DEFAULT_STEP = 300
MAX_FUTURE_SECONDS = 86400
REASONS = ", ".join(f"`{r}`" for r in sorted(stats.REFUSAL_REASONS))


class LoginResults(BaseModel):
    """Logins of one protocol by result."""

    ok: int = 0
    invalid: int = Field(default=0, description="Unknown user or wrong password (R-LOG-4 answers both alike).")
    locked: int = Field(default=0, description="Refused because the account is locked (R-LOG-1).")
    ip_restricted: int = Field(default=0, description="Refused by the account's allowed IPs (R-LOG-3).")
    second_factor: int = Field(default=0, description="A password without the second factor (R-2FA).")
    tempfail: int = Field(default=0, description="Not decided: a backing service failed (fail closed).")
    other: int = 0


class LoginCounts(BaseModel):
    smtp: LoginResults = Field(default_factory=LoginResults, description="SMTP AUTH on the edge.")
    imap: LoginResults = Field(default_factory=LoginResults)
    pop3: LoginResults = Field(default_factory=LoginResults)
    admin: LoginResults = Field(default_factory=LoginResults, description="Logins to this API and the console.")
    other: LoginResults = Field(default_factory=LoginResults)


class StatsBucketOut(BaseModel):
    start: dt.datetime = Field(description="The bucket's first instant (RFC 3339, UTC).")
    end: dt.datetime = Field(description="The instant after the bucket.")
    accepted: int = Field(description="Messages the SMTP edge stored and answered 250 for.")
    refused: dict[str, int] = Field(description="SMTP commands refused, by the policy service or by the SMTP "
                                                f"edge itself (syntax, size, a failed policy call), by reason: "
                                                f"{REASONS}. Reasons with no refusal are left out.")
    refused_total: int
    logins: LoginCounts
    ips_blocked: int = Field(description="IPs blocked by intrusion prevention (R-IPS).")
    ips_refused: int = Field(description="Connections and commands refused because their IP was blocked.")


class BlockedIp(BaseModel):
    ip: str
    count: int = Field(description="Blocks put on it plus refusals while it was blocked, in the range.")


class StatsOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: dt.datetime = Field(alias="from", description="The range's start, aligned down to the step.")
    to: dt.datetime = Field(description="The range's end, aligned up to the step.")
    step: int = Field(description="Seconds per bucket.")
    buckets: list[StatsBucketOut] = Field(description="Every bucket of the range, oldest first (zeros included).")
    totals: StatsBucketOut = Field(description="The whole range.")
    top_blocked_ips: list[BlockedIp] = Field(description="The most refused blocked IPs, most first.")


def _utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def bucket_out(bucket: stats.StatsBucket) -> StatsBucketOut:
    logins = LoginCounts()
    for protocol, results in bucket.logins.items():
        target = getattr(logins, protocol if protocol in LoginCounts.model_fields else "other")
        for result, n in results.items():
            name = result if result in LoginResults.model_fields else "other"
            setattr(target, name, getattr(target, name) + n)
    return StatsBucketOut(
        start=_utc(bucket.start), end=_utc(bucket.start + bucket.seconds), accepted=bucket.accepted,
        refused=dict(sorted(bucket.refused.items())), refused_total=bucket.refused_total, logins=logins,
        ips_blocked=bucket.ips_blocked, ips_refused=bucket.ips_refused,
    )


def series_out(series: stats.StatsSeries) -> StatsOut:
    return StatsOut(
        from_=_utc(series.start), to=_utc(series.end), step=series.step,
        buckets=[bucket_out(b) for b in series.buckets], totals=bucket_out(series.totals),
        top_blocked_ips=[BlockedIp(ip=ip, count=n) for ip, n in series.top_blocked_ips],
    )


@router.get("/v1/stats", operation_id="getStats", response_model=StatsOut, response_model_by_alias=True,
            responses={401: _P, 403: _P, 422: _P},
            description="Counts over a time range, in buckets of `step` seconds aligned to the epoch (a "
                        "one-day step gives UTC days): messages accepted, SMTP refusals by reason, logins "
                        "by protocol and result, IP blocks, and the top blocked IPs. At most 1,440 buckets; "
                        "a step under an hour reaches back 48 hours, whole hours 32 days. Counts reach "
                        "this view about a second after the decision.")
async def get_stats(
    principal: SuperadminDep,
    backend: BackendDep,
    from_: Annotated[AwareDatetime | None, Query(alias="from", description="RFC 3339; default: `to` - 1 hour.")] = None,
    to: Annotated[AwareDatetime | None, Query(description="RFC 3339; default: now.")] = None,
    step: Annotated[int, Query(ge=stats.MINUTE, le=stats.MAX_STEP, multiple_of=stats.MINUTE,
                               description="Seconds per bucket, whole minutes.")] = DEFAULT_STEP,
    top: Annotated[int, Query(ge=0, le=stats.MAX_TOP_IPS, description="How many blocked IPs to list.")] = 10,
) -> StatsOut:
    try:
        end = to.timestamp() if to is not None else time.time()
        start = from_.timestamp() if from_ is not None else end - stats.HOUR
    except (OverflowError, OSError, ValueError):
        raise invalid("Invalid range", "from", "not a representable time", "query") from None
    if end > time.time() + MAX_FUTURE_SECONDS:
        raise invalid("Invalid range", "to", "at most one day from now", "query")
    try:
        series = await stats.read_series(backend.redis, start, end, step, top_ips=top)
    except stats.StatsRangeError as exc:
        raise invalid("Invalid range", exc.field, exc.detail, "query") from None
    return series_out(series)
