"""rempart.common.stats over a real Redis: what the replicas count is what a range reads back."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from rempart.common import stats
from rempart.common.redisconn import connect_redis
from rempart.common.testing.localstack import free_port

# 2026-12-01 10:00:00 UTC: an hour boundary, so that minute and hour buckets line up.
T0 = 1_796_119_200.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_r_adm_stats_counts_of_two_replicas_are_summed_per_bucket(redis: aioredis.Redis) -> None:
    clock = Clock(T0 + 5)
    edge_a = stats.StatsRecorder(redis, clock=clock)
    edge_b = stats.StatsRecorder(redis, clock=clock)
    for _ in range(3):
        edge_a.message_accepted()
    edge_b.message_accepted()
    edge_a.refusal(stats.refusal_reason("R-DOM-1"))
    edge_b.login("imap", "ok")
    edge_b.login("imap", "invalid")
    clock.now = T0 + 130  # two minutes later, the third minute bucket
    edge_a.refusal(stats.refusal_reason("R-REL-1"))
    edge_a.refusal(stats.refusal_reason("R-REL-4"))
    edge_b.login("admin", "ok")
    await asyncio.gather(edge_a.flush(), edge_b.flush())

    series = await stats.read_series(redis, T0, T0 + 240, 60, now=T0 + 300)
    assert [b.start for b in series.buckets] == [int(T0) + 60 * n for n in range(4)]
    first, second, third, fourth = series.buckets
    assert (first.accepted, dict(first.refused), first.refused_total) == (4, {"unknown_recipient": 1}, 1)
    assert first.logins == {"imap": {"ok": 1, "invalid": 1}}
    assert second == stats.StatsBucket(int(T0) + 60, 60)  # nothing happened: zeros, not missing
    assert dict(third.refused) == {"relay_denied": 2} and third.logins == {"admin": {"ok": 1}}
    assert fourth.refused_total == 0
    assert series.totals.accepted == 4 and series.totals.refused_total == 3
    assert series.granularity == stats.MINUTE

    # Wider buckets are sums of narrower ones; whole-hour steps read the hour buckets.
    five = await stats.read_series(redis, T0, T0 + 300, 300, now=T0 + 300)
    assert len(five.buckets) == 1 and five.buckets[0].accepted == 4 and five.buckets[0].refused_total == 3
    hourly = await stats.read_series(redis, T0, T0 + 3600, 3600, now=T0 + 300)
    assert hourly.granularity == stats.HOUR
    assert hourly.buckets[0].accepted == 4 and dict(hourly.buckets[0].refused) == {
        "unknown_recipient": 1, "relay_denied": 2}
    assert hourly.buckets[0].logins == {"imap": {"ok": 1, "invalid": 1}, "admin": {"ok": 1}}


async def test_r_adm_stats_buckets_expire(redis: aioredis.Redis) -> None:
    recorder = stats.StatsRecorder(redis, clock=Clock(T0))
    recorder.message_accepted()
    recorder.ip_refused("192.0.2.7")
    await recorder.flush()
    minute_ttl = await redis.ttl(stats.counts_key(stats.MINUTE, int(T0)))
    hour_ttl = await redis.ttl(stats.counts_key(stats.HOUR, int(T0)))
    ips_ttl = await redis.ttl(stats.blocked_ips_key(stats.MINUTE, int(T0)))
    hour_ips_ttl = await redis.ttl(stats.blocked_ips_key(stats.HOUR, int(T0)))
    assert 47 * 3600 < minute_ttl <= stats.RETENTION[stats.MINUTE] + 60  # minute counts: 48 h
    assert stats.RETENTION[stats.MINUTE] < hour_ttl <= stats.RETENTION[stats.HOUR] + 3600
    # Minute IP sets (up to 1,000 IPs each) two hours only: 300 MB under a botnet otherwise.
    assert 3600 < ips_ttl <= 2 * 3600 + 60
    assert 31 * 86400 < hour_ips_ttl <= stats.RETENTION[stats.HOUR] + 3600


async def test_r_adm_stats_older_minute_ranges_take_top_ips_from_the_hour_sets(redis: aioredis.Redis) -> None:
    """Three hours ago the minute IP sets are gone: the top IPs come from the hour sets."""
    old = T0 - 3 * 3600
    recorder = stats.StatsRecorder(redis, clock=Clock(old + 120))
    for _ in range(4):
        recorder.ip_refused("198.51.100.20")
    recorder.ip_refused("203.0.113.5")
    await recorder.flush()
    await redis.delete(stats.blocked_ips_key(stats.MINUTE, int(old) + 120))  # as Redis would have
    series = await stats.read_series(redis, old, old + 600, 300, now=T0)
    assert series.granularity == stats.MINUTE and series.totals.ips_refused == 5
    assert series.top_blocked_ips == [("198.51.100.20", 4), ("203.0.113.5", 1)]
    recent = stats.StatsRecorder(redis, clock=Clock(T0 - 600))
    recent.ip_refused("192.0.2.99")
    await recent.flush()
    await redis.delete(stats.blocked_ips_key(stats.HOUR, int(T0) - 3600))
    # A recent range still reads the exact minute sets.
    assert (await stats.read_series(redis, T0 - 900, T0, 300, now=T0)).top_blocked_ips == [("192.0.2.99", 1)]


async def test_r_adm_stats_top_blocked_ips_ranked_and_bounded(redis: aioredis.Redis) -> None:
    clock = Clock(T0)
    recorder = stats.StatsRecorder(redis, clock=clock)
    recorder.ip_blocked("198.51.100.9")
    for _ in range(5):
        recorder.ip_refused("198.51.100.9")
    clock.now = T0 + 61
    for _ in range(3):
        recorder.ip_refused("2001:db8:0:0::1")  # shown in its canonical form
    recorder.ip_refused("203.0.113.4")
    recorder.ip_refused("not an ip")  # counted as a refusal, named nowhere
    await recorder.flush()
    series = await stats.read_series(redis, T0, T0 + 120, 60, top_ips=2, now=T0 + 120)
    assert series.top_blocked_ips == [("198.51.100.9", 6), ("2001:db8::1", 3)]
    assert series.totals.ips_blocked == 1 and series.totals.ips_refused == 10
    assert [b.ips_refused for b in series.buckets] == [5, 5]

    # A botnet cannot grow a bucket without bound: the least refused go when it is full.
    for n in range(stats.MAX_IPS_PER_BUCKET + 50):
        recorder.ip_refused(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    await recorder.flush()
    assert await redis.zcard(stats.blocked_ips_key(stats.MINUTE, int(T0) + 60)) == stats.MAX_IPS_PER_BUCKET
    assert await redis.zscore(stats.blocked_ips_key(stats.MINUTE, int(T0) + 60), "2001:db8::1") == 3


async def test_r_adm_stats_field_names_come_from_fixed_sets(redis: aioredis.Redis) -> None:
    recorder = stats.StatsRecorder(redis, clock=Clock(T0))
    recorder.refusal("made-up reason")
    recorder.login("gopher", "ok")
    recorder.login("imap", "??")
    await recorder.flush()
    fields = await redis.hgetall(stats.counts_key(stats.MINUTE, int(T0)))
    assert set(fields) == {"smtp.refused.other", "login.other.ok", "login.imap.other"}
    assert stats.refusal_reason("redis-unavailable", temporary=True) == "temporary_failure"
    assert stats.refusal_reason("R-IPS-4") == "intrusion_prevention"


async def test_r_adm_stats_written_in_the_background_within_the_flush_interval(redis: aioredis.Redis) -> None:
    recorder = stats.StatsRecorder(redis, flush_seconds=0.05)
    recorder.message_accepted()
    recorder.message_accepted()
    minute = int(time.time()) // 60 * 60
    deadline = time.monotonic() + 5
    while await redis.hget(stats.counts_key(stats.MINUTE, minute), stats.ACCEPTED) != "2":
        assert time.monotonic() < deadline, "the counts were never written"
        await asyncio.sleep(0.02)
    series = await stats.last_hour(redis)
    assert series.totals.accepted == 2 and len(series.buckets) in (12, 13)
    await recorder.close()


async def test_r_ops_3_stats_never_fail_or_hold_up_the_caller_when_redis_is_down() -> None:
    down = connect_redis(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        recorder = stats.StatsRecorder(down, flush_seconds=0.01)
        started = time.monotonic()
        for _ in range(100):
            recorder.message_accepted()
            recorder.login("smtp", "ok")
        assert time.monotonic() - started < 0.1  # the caller never waits for Redis
        await recorder.close()
        assert recorder.dropped == 200
        # Pending counts are bounded while Redis is away.
        for n in range(stats.MAX_PENDING + 10):
            recorder.ip_refused(f"10.0.{n // 256}.{n % 256}")
        assert len(recorder._counts) + len(recorder._ips) <= stats.MAX_PENDING
        # Closed: no background flush is left to outlive the client closed below (it was, and
        # ran against a closed client on a loaded CI).
        assert recorder._task is None
    finally:
        await down.aclose()


@pytest.mark.parametrize(("start", "end", "step", "field"), [
    (T0, T0 + 60, 30, "step"),  # under a minute
    (T0, T0 + 60, 90, "step"),  # not whole minutes
    (T0, T0 + 60, 2 * 86400, "step"),
    (T0, T0, 60, "to"),
    (T0 + 60, T0, 60, "to"),
    (T0, T0 + 2 * 86400, 60, "step"),  # more than 1440 points
    (T0 - 50 * 3600, T0 - 47 * 3600, 300, "from"),  # minute buckets are gone
    (T0 - 3 * 86400, T0, 3 * 3600 + 60, "step"),  # 3 days of minute buckets to read
    (T0 - 40 * 86400, T0, 3600, "from"),  # hour buckets are gone
    (float("nan"), T0, 60, "from"),
])
def test_r_adm_stats_ranges_out_of_bounds_name_the_parameter(start: float, end: float, step: int, field: str) -> None:
    with pytest.raises(stats.StatsRangeError) as refused:
        stats.plan_range(start, end, step, now=T0)
    assert refused.value.field == field, refused.value.detail


async def test_r_adm_stats_close_writes_what_is_pending_at_once(redis: aioredis.Redis) -> None:
    recorder = stats.StatsRecorder(redis, flush_seconds=60, clock=Clock(T0))
    recorder.login("pop3", "ok")
    assert await redis.hgetall(stats.counts_key(stats.MINUTE, int(T0))) == {}  # not written yet
    await recorder.close()  # a service stopping: the last counts are not left behind
    assert await redis.hgetall(stats.counts_key(stats.MINUTE, int(T0))) == {"login.pop3.ok": "1"}
