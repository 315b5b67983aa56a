"""What the status page shows: readiness of what this process depends on and of every service's
pods, the outbound queue, and the last hour's mail as a chart drawn here (an inline SVG in the
page: no script, no image request).

- Readiness: Redis, NATS JetStream and the auth service are asked directly, each within
  :data:`CHECK_SECONDS`; so is every ``/readyz`` URL of ``REMPART_STATUS_READINESS_URLS``
  (the other services outside Kubernetes: ``make run`` sets them); in a cluster, every service
  through its pods' Ready condition (their ``/readyz`` or gRPC health probes, as the kubelet
  sees them) from the API's cluster view (:func:`rempart.admin_api.routes_cluster.list_pods`).
  Each is shown up or down with what went wrong in words ("connection refused", "no answer
  within 1.5 s", "HTTP 503: redis: ConnectionError ...", "0 of 2 pods ready"), never a stack
  trace; outside Kubernetes the page says why there are no pods to show.
- The outbound queue: how many transactions the relay has not finished with and how long the
  oldest has waited (:meth:`rempart.common.outqueue.OutboundQueue.depth_and_oldest_ms`).
- The chart: messages accepted and SMTP commands refused per bucket of the last hour, from the
  counters every replica writes (:func:`rempart.common.stats.last_hour`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import grpc
import httpx
import redis.asyncio as aioredis
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError

from rempart.admin_api.routes_cluster import ClusterOut
from rempart.common.stats import StatsSeries

CHECK_SECONDS = 1.5
MAX_DETAIL = 200
MAX_READYZ_BYTES = 4096  # of a /readyz answer: one line per check
# The chart's drawing area, in SVG user units.
CHART_HEIGHT = 100
CHART_TOP = 10
BAR_WIDTH = 9
BAR_GAP = 2
GROUP_GAP = 8
AXIS_SPACE = 34
RIGHT_SPACE = 24


@dataclass(frozen=True)
class Readiness:
    name: str
    up: bool
    detail: str


class NotReady(Exception):
    """A ``/readyz`` answered, but not 200; the message is what it said."""


def _os_error_in(exc: BaseException) -> OSError | None:
    """The innermost OSError behind ``exc`` (httpx wraps a refused connection twice)."""
    found, seen = None, set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            found = current
        todo += [current.__cause__, current.__context__]
    return found


def in_words(exc: BaseException, seconds: float = CHECK_SECONDS) -> str:
    """Why a check failed, as an operator reads it."""
    if isinstance(exc, NotReady):
        return str(exc)[:MAX_DETAIL]
    if isinstance(exc, httpx.HTTPError):
        cause = _os_error_in(exc)
        return in_words(cause, seconds) if cause is not None else f"{type(exc).__name__}: {exc}"[:MAX_DETAIL]
    if isinstance(exc, TimeoutError):
        return f"no answer within {seconds:g} s"
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        name = code.name.lower().replace("_", " ") if code is not None else "error"
        return f"{name}: {exc.details() or 'no detail'}"[:MAX_DETAIL]
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, NotFoundError):
        return "stream not found"
    if isinstance(exc, aioredis.RedisError | NatsError | OSError):
        text = str(exc).strip() or type(exc).__name__
        return text[:MAX_DETAIL]
    return type(exc).__name__


async def check(name: str, probe: Callable[[], Awaitable[str]], seconds: float = CHECK_SECONDS) -> Readiness:
    """Run ``probe`` (which answers what it saw, or raises) within ``seconds``."""
    started = time.monotonic()
    try:
        seen = await asyncio.wait_for(probe(), seconds)
    except Exception as exc:  # noqa: BLE001 - any failure is "down", said in words
        return Readiness(name, False, in_words(exc, seconds))
    return Readiness(name, True, f"{seen} ({(time.monotonic() - started) * 1000:.0f} ms)")


async def readyz(client: httpx.AsyncClient, url: str) -> str:
    """Ask one service's ``/readyz``: what it said when 200, :class:`NotReady` naming the checks
    that failed otherwise (its answer is ``name: ok`` or ``name: error``, one line each)."""
    body = bytearray()
    async with client.stream("GET", url) as reply:
        async for chunk in reply.aiter_bytes():
            body += chunk
            if len(body) >= MAX_READYZ_BYTES:
                break
    lines = [line.strip() for line in body[:MAX_READYZ_BYTES].decode(errors="replace").splitlines() if line.strip()]
    if reply.status_code != 200:
        failing = [line for line in lines if not line.endswith(": ok")] or lines
        raise NotReady(f"HTTP {reply.status_code}: " + ("; ".join(failing) or "no detail"))
    return f"ready ({len(lines)} check{'s' if len(lines) != 1 else ''} ok)"


async def services_readiness(urls: Mapping[str, str], seconds: float = CHECK_SECONDS) -> list[Readiness]:
    """One row per configured ``/readyz`` URL, asked concurrently, each within ``seconds``
    (the URL itself is not shown: it may carry credentials)."""
    if not urls:
        return []
    timeout = httpx.Timeout(seconds + 1)  # the check's own bound comes first
    async with httpx.AsyncClient(timeout=timeout, trust_env=False, follow_redirects=False) as client:
        rows = await asyncio.gather(*(check(name, functools.partial(readyz, client, url), seconds)
                                      for name, url in sorted(urls.items())))
    return list(rows)


def pods_readiness(cluster: ClusterOut) -> list[Readiness]:
    """One row per component: up while at least one of its pods is ready (it receives traffic),
    with the pods that are not ready named."""
    components: dict[str, list[tuple[str, bool, str]]] = {}
    for pod in cluster.pods:
        why = pod.phase if pod.phase != "Running" else f"{pod.containers_ready} of {pod.containers} containers ready"
        if pod.restarts:
            why += f", {pod.restarts} restart{'s' if pod.restarts != 1 else ''}"
        components.setdefault(pod.component or "unlabelled", []).append((pod.name, pod.ready, why))
    rows = []
    for component, pods in sorted(components.items()):
        ready = sum(1 for _, is_ready, _ in pods if is_ready)
        detail = f"{ready} of {len(pods)} pod{'s' if len(pods) != 1 else ''} ready"
        waiting = [f"{name} ({why})" for name, is_ready, why in pods if not is_ready]
        if waiting:
            detail += "; not ready: " + ", ".join(waiting[:5]) + (" ..." if len(waiting) > 5 else "")
        rows.append(Readiness(f"{component} pods", ready > 0, detail[:MAX_DETAIL * 2]))
    return rows


def age_in_words(seconds: float) -> str:
    """A waiting time as people say it: 42 s, 7 min, 3 h 5 min, 2 d 4 h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


@dataclass(frozen=True)
class Queue:
    depth: int
    oldest_age: str  # "" when the queue is empty


def queue_of(depth: int, oldest_ms: int, now: float) -> Queue:
    return Queue(depth, age_in_words(now - oldest_ms / 1000) if depth and oldest_ms else "")


@dataclass(frozen=True)
class Bar:
    x: int
    y: int
    height: int
    kind: str  # "accepted" or "refused"
    count: int
    label: str  # what the bar stands for, for its <title>


@dataclass(frozen=True)
class Row:
    span: str  # "10:05 to 10:10"
    accepted: int
    refused: int


@dataclass(frozen=True)
class Chart:
    """Two bars per bucket (accepted, refused), scaled to the largest count; the same counts as
    table rows for those who do not see the picture."""

    width: int
    height: int
    baseline: int  # the y of the zero line
    bar_width: int
    bars: list[Bar]
    ticks: list[tuple[int, str]]  # (x, "HH:MM") under the first bar of every few buckets
    top: int  # the count a full-height bar stands for
    rows: list[Row]
    accepted: int
    refused: int


def _clock(start: int) -> str:
    return time.strftime("%H:%M", time.gmtime(start))


def chart_of(series: StatsSeries) -> Chart:
    top = max([1, *(max(b.accepted, b.refused_total) for b in series.buckets)])
    bars: list[Bar] = []
    rows: list[Row] = []
    ticks: list[tuple[int, str]] = []
    group = 2 * BAR_WIDTH + BAR_GAP + GROUP_GAP
    every = max(1, len(series.buckets) // 6)
    for i, bucket in enumerate(series.buckets):
        x = AXIS_SPACE + i * group
        span = f"{_clock(bucket.start)} to {_clock(bucket.start + bucket.seconds)}"
        rows.append(Row(span, bucket.accepted, bucket.refused_total))
        for offset, kind, count in ((0, "accepted", bucket.accepted),
                                    (BAR_WIDTH + BAR_GAP, "refused", bucket.refused_total)):
            height = round(CHART_HEIGHT * count / top)
            bars.append(Bar(x + offset, CHART_TOP + CHART_HEIGHT - height, height, kind, count,
                            f"{span} UTC: {count} {kind}"))
        if i % every == 0:
            ticks.append((x, _clock(bucket.start)))
    width = AXIS_SPACE + len(series.buckets) * group + RIGHT_SPACE  # room for the last time's label
    baseline = CHART_TOP + CHART_HEIGHT
    return Chart(width, baseline + 20, baseline, BAR_WIDTH, bars, ticks, top, rows, series.totals.accepted,
                 series.totals.refused_total)
