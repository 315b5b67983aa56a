"""The ops HTTP endpoint of every service: ``/healthz``, ``/readyz`` and ``/metrics``.

``/readyz`` runs the service's real checks (Redis PING, NATS connected, gRPC peers healthy),
each with a deadline, and answers 503 naming what failed, so that a pod that lost a
dependency leaves the load balancer instead of answering mail with errors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]
MAX_REQUEST_BYTES = 8192
CHECK_TIMEOUT = 2.0


def redis_check(redis: aioredis.Redis) -> ReadinessCheck:
    async def check() -> None:
        await redis.ping()

    return check


def nats_check(nc: NATS) -> ReadinessCheck:
    async def check() -> None:
        if not nc.is_connected:
            raise ConnectionError("NATS not connected")

    return check


def _header(head: bytes, name: bytes) -> str:
    """A request header's value ("" when absent), from the raw request head."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""


class OpsServer:
    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._checks: dict[str, ReadinessCheck] = {}
        self._server: asyncio.Server | None = None
        self.draining = False

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def readiness(self) -> dict[str, str]:
        """Name -> "ok" or the error; every check runs concurrently with a deadline."""

        async def run(check: ReadinessCheck) -> str:
            try:
                await asyncio.wait_for(check(), CHECK_TIMEOUT)
                return "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                return f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
            except asyncio.CancelledError:
                # grpc.aio raises CancelledError for a call its closing channel cancelled (the
                # process is stopping): not ready. A cancellation of this very task goes on.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                return "CancelledError: the check's call was cancelled"

        names = list(self._checks)
        results = await asyncio.gather(*(run(self._checks[n]) for n in names))
        out = dict(zip(names, results, strict=True))
        if self.draining:
            out["draining"] = "shutting down"
        return out

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            if len(head) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            method, path = parts[0].decode(), parts[1].decode().split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                await self._reply(writer, 405, b"method not allowed\n", "text/plain")
            elif path == "/healthz":
                await self._reply(writer, 200, b"ok\n", "text/plain")
            elif path == "/readyz":
                results = await self.readiness()
                ready = all(v == "ok" for v in results.values())
                body = "".join(f"{k}: {v}\n" for k, v in results.items()).encode()
                await self._reply(writer, 200 if ready else 503, body, "text/plain")
            elif path == "/metrics":
                # OpenMetrics when the scraper asks for it (Prometheus does): the only format
                # that carries exemplars (rempart.common.metrics); else the text format 0.0.4.
                encoder, content_type = choose_encoder(_header(head, b"accept"))
                await self._reply(writer, 200, encoder(REGISTRY), content_type)
            else:
                await self._reply(writer, 404, b"not found\n", "text/plain")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, ValueError, IndexError) as exc:
            log.debug("ops request dropped: %s", type(exc).__name__)
        except asyncio.CancelledError:
            # The process is stopping with a probe in flight: the connection just closes. (On
            # Python 3.11 asyncio's stream callback reads a cancelled handler's exception and
            # logs it as an error: a rolling update found one in a draining edge's log.)
            log.debug("ops request dropped: stopping")
        finally:
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
