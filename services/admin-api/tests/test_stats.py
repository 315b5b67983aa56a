"""GET /v1/stats over real Redis: what the services' recorders write is what the API answers.

The whole path (real mail through a running edge, real logins, then this route) is
tests/e2e/test_stats_e2e.py; here the counts are written by :class:`StatsRecorder` as the
services write them, at chosen times, so that every bucket's figure can be checked.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest

from rempart.common import stats

from .conftest import Harness

PROBLEM = "application/problem+json"


def rfc3339(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


async def test_r_adm_stats_buckets_counts_and_top_blocked_ips(harness: Harness, admin_headers: dict[str, str]) -> None:
    now = time.time()
    base = int(now) // 3600 * 3600 - 3600  # the previous whole hour
    clock_at = {"t": base + 10.0}
    recorder = stats.StatsRecorder(harness.backend.redis, clock=lambda: clock_at["t"])
    for _ in range(3):
        recorder.message_accepted()
    recorder.refusal(stats.refusal_reason("R-DOM-1"))
    recorder.login("imap", "ok")
    recorder.login("pop3", "invalid")
    recorder.login("smtp", "locked")
    recorder.ip_blocked("203.0.113.50")
    clock_at["t"] = base + 310.0  # the second 5-minute bucket
    recorder.message_accepted()
    recorder.refusal(stats.refusal_reason("R-REL-1"))
    recorder.refusal(stats.refusal_reason("R-DNS-1"))
    recorder.login("admin", "ok")
    for _ in range(4):
        recorder.ip_refused("203.0.113.50")
    recorder.ip_refused("198.51.100.1")
    await recorder.flush()

    reply = await harness.http.get("/v1/stats", headers=admin_headers,
                                   params={"from": rfc3339(base), "to": rfc3339(base + 900), "step": 300})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["from"], body["to"], body["step"]) == (rfc3339(base), rfc3339(base + 900), 300)
    assert [b["start"] for b in body["buckets"]] == [rfc3339(base + n * 300) for n in range(3)]
    first, second, third = body["buckets"]
    assert first["end"] == rfc3339(base + 300)
    assert (first["accepted"], first["refused"], first["refused_total"]) == (3, {"unknown_recipient": 1}, 1)
    assert first["logins"]["imap"]["ok"] == 1 and first["logins"]["pop3"]["invalid"] == 1
    assert first["logins"]["smtp"]["locked"] == 1 and first["logins"]["admin"]["ok"] == 0
    assert (first["ips_blocked"], first["ips_refused"]) == (1, 0)
    assert second["accepted"] == 1 and second["refused"] == {"dnsbl": 1, "relay_denied": 1}
    assert second["logins"]["admin"]["ok"] == 1 and second["ips_refused"] == 5
    assert third["accepted"] == 0 and third["refused"] == {} and third["refused_total"] == 0
    totals = body["totals"]
    assert (totals["accepted"], totals["refused_total"], totals["start"], totals["end"]) == (
        4, 3, rfc3339(base), rfc3339(base + 900))
    assert body["top_blocked_ips"] == [{"ip": "203.0.113.50", "count": 5}, {"ip": "198.51.100.1", "count": 1}]

    # A whole-hour step reads the hour buckets: the same totals.
    hourly = await harness.http.get("/v1/stats", headers=admin_headers,
                                    params={"from": rfc3339(base), "to": rfc3339(base + 3600), "step": 3600})
    assert hourly.status_code == 200, hourly.text
    assert [(b["accepted"], b["refused_total"]) for b in hourly.json()["buckets"]] == [(4, 3)]

    # The default range is the last hour in 5-minute buckets.
    recent = await harness.http.get("/v1/stats", headers=admin_headers, params={"top": 0})
    assert recent.status_code == 200, recent.text
    assert recent.json()["step"] == 300 and len(recent.json()["buckets"]) in (12, 13)
    assert recent.json()["top_blocked_ips"] == []


@pytest.mark.parametrize(("params", "field"), [
    ({"step": 90}, "step"),
    ({"step": 30}, "step"),
    ({"step": 2 * 86400}, "step"),
    ({"from": "2026-12-01T10:00:00Z", "to": "2026-12-01T09:00:00Z"}, "to"),
    ({"from": "2026-12-01T10:00:00"}, "from"),  # no time zone: ambiguous, refused
    ({"to": "not a time"}, "to"),
    ({"to": "2999-01-01T00:00:00Z"}, "to"),
    ({"from": "2000-01-01T00:00:00Z", "to": "2000-01-02T00:00:00Z", "step": 3600}, "from"),  # long gone
    ({"top": 101}, "top"),
])
async def test_r_adm_2_stats_bad_range_is_a_problem_naming_the_parameter(
    harness: Harness, admin_headers: dict[str, str], params: dict[str, object], field: str
) -> None:
    reply = await harness.http.get("/v1/stats", headers=admin_headers, params=params)
    assert reply.status_code == 422, reply.text
    assert reply.headers["content-type"].startswith(PROBLEM)
    assert [e["field"] for e in reply.json()["errors"]] == [field]
    assert [e["location"] for e in reply.json()["errors"]] == ["query"]


async def test_r_adm_1_stats_are_for_superadmins_only(harness: Harness) -> None:
    assert (await harness.http.get("/v1/stats")).status_code == 401
    await harness.add_account("helpdesk@example.net", "Helpdesk-Pw-1234", "domain_admin")
    domain_admin = await harness.login("helpdesk@example.net", "Helpdesk-Pw-1234")
    reply = await harness.http.get("/v1/stats", headers=domain_admin)
    assert reply.status_code == 403 and reply.headers["content-type"].startswith(PROBLEM)


async def test_r_adm_stats_refused_is_described_as_counted_by_policy_and_edge(harness: Harness) -> None:
    """The edge counts its own refusals too (syntax, size): the document must not say "by policy" only."""
    spec = (await harness.http.get("/v1/openapi.json")).json()
    text = spec["components"]["schemas"]["StatsBucketOut"]["properties"]["refused"]["description"]
    assert "refused by policy," not in text and "SMTP edge itself" in text
