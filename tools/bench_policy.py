"""Policy benchmark (issue 3): Check decisions per second and p50/p99 latency at 20 calls in
flight, beside a bare grpc.aio echo service measured in the same run on the same machine.

    .venv/bin/python tools/bench_policy.py [-n 20000] [--in-flight 20]

It starts a throwaway Redis and NATS (``rempart.common.localstack``), the policy service as
``python -m rempart.policy`` in a subprocess, and an echo service (this script with ``--echo``:
one generic unary method that returns its request bytes, no proto) in another subprocess. The
policy load is a realistic mix: CONNECT (IPS screen and counters), RCPT to a local account, and
RCPT to a remote address from an untrusted client (relay denied, counted for R-IPS-3); every
call comes from its own client IP so that no IP reaches a block threshold. The echo service gets
the same number of calls with the same payload bytes. The ratio says what the policy's decisions
cost over gRPC's own floor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc

from rempart.common.directory import Directory
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc
from rempart.common.redisconn import connect_redis
from rempart.common.testing.localstack import child_env, free_port, start_nats, start_redis, wait_for_port

ECHO_METHOD = "/rempart.bench.Echo/Echo"


# The echo service (run in its own process) ----------------------------------------------------
async def _serve_echo(port: int) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "rempart.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


# The load ------------------------------------------------------------------------------------
def _ip(n: int) -> str:
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def policy_requests(count: int) -> list[policy_pb2.CheckRequest]:
    out = []
    for n in range(count):
        session = policy_pb2.SessionFacts(
            session_id=f"bench-{n}", client_ip=_ip(n + 1), protocol=policy_pb2.PROTOCOL_SMTP,
            helo_name="client.remote.test", edge_instance="bench",
        )
        kind = n % 3
        if kind == 0:
            out.append(policy_pb2.CheckRequest(stage=policy_pb2.STAGE_CONNECT, session=session))
        elif kind == 1:
            out.append(policy_pb2.CheckRequest(stage=policy_pb2.STAGE_RCPT, session=session,
                                               mail_from="sender@remote.test", recipient="bob@example.test"))
        else:
            out.append(policy_pb2.CheckRequest(stage=policy_pb2.STAGE_RCPT, session=session,
                                               mail_from="sender@remote.test", recipient="victim@elsewhere.test"))
    return out


@dataclass
class Result:
    name: str
    calls: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def line(self) -> str:
        return (f"{self.name:>6}: {self.calls} calls in {self.seconds:.2f} s = {self.rate:,.0f} calls/s, "
                f"p50 {self.quantile(0.50):.2f} ms, p99 {self.quantile(0.99):.2f} ms, "
                f"mean {statistics.fmean(self.latencies) * 1000:.2f} ms")


async def drive(name: str, calls: list[Callable[[], Awaitable[object]]], in_flight: int) -> Result:
    latencies: list[float] = []
    queue = iter(calls)

    async def worker() -> None:
        for call in queue:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return Result(name, len(calls), time.perf_counter() - started, latencies)


async def seed_directory(redis_url: str) -> None:
    redis = connect_redis(redis_url)
    directory = Directory(redis)
    await directory.add_domain("example.test")
    await directory.add_account("bob@example.test")
    await redis.aclose()


async def measure(policy_port: int, echo_port: int, count: int, in_flight: int) -> tuple[Result, Result]:
    requests = policy_requests(count)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{policy_port}") as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        verdicts: list[policy_pb2.Verdict] = []

        async def check(request: policy_pb2.CheckRequest) -> None:
            verdicts.append(await stub.Check(request, timeout=10))

        await drive("warmup", [partial(check, r) for r in policy_requests(300)], in_flight)
        verdicts.clear()
        policy = await drive("policy", [partial(check, r) for r in requests], in_flight)
    outcomes = sorted({(v.code, v.rule) for v in verdicts})
    if any(code >= 400 and rule != "R-REL-1" for code, rule in outcomes):
        raise SystemExit(f"unexpected verdicts in the policy run: {outcomes}")

    payloads = [r.SerializeToString() for r in requests]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{echo_port}") as channel:
        echo_call = channel.unary_unary(ECHO_METHOD)

        async def echo_once(payload: bytes) -> None:
            await echo_call(payload, timeout=10)

        await drive("warmup", [partial(echo_once, p) for p in payloads[:300]], in_flight)
        echo = await drive("echo", [partial(echo_once, p) for p in payloads], in_flight)
    return policy, echo


def run(count: int, in_flight: int, workdir: Path) -> tuple[Result, Result]:
    redis_server = start_redis(workdir / "redis")
    nats_server = start_nats(workdir / "nats")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(seed_directory(redis_server.url))
        policy_port, echo_port = free_port(), free_port()
        env = child_env(
            REMPART_REDIS_URL=redis_server.url, REMPART_NATS_URL=nats_server.url,
            REMPART_GRPC_HOST="127.0.0.1", REMPART_GRPC_PORT=str(policy_port),
            REMPART_OPS_HOST="127.0.0.1", REMPART_OPS_PORT=str(free_port()),
            REMPART_LOG_LEVEL="WARNING", REMPART_SHUTDOWN_GRACE_SECONDS="2",
        )
        with (workdir / "policy.log").open("wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "rempart.policy"], env=env, stdout=log, stderr=log))
        procs.append(subprocess.Popen([sys.executable, __file__, "--echo", str(echo_port)]))
        wait_for_port("127.0.0.1", policy_port, timeout=30, proc=procs[0])
        wait_for_port("127.0.0.1", echo_port, timeout=30, proc=procs[1])
        return asyncio.run(measure(policy_port, echo_port, count, in_flight))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        nats_server.stop()
        redis_server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", "--calls", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=20)
    parser.add_argument("--echo", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        asyncio.run(_serve_echo(args.echo))
        return 0
    with tempfile.TemporaryDirectory(prefix="rempart-bench-policy-") as tmp:
        policy, echo = run(args.calls, args.in_flight, Path(tmp))
    print(f"policy benchmark: {args.calls} calls each, {args.in_flight} in flight, {os.cpu_count()} CPUs")
    print("  mix: 1/3 CONNECT, 1/3 RCPT local account, 1/3 RCPT relay denied (one client IP per call)")
    print(policy.line())
    print(echo.line())
    print(f"ratio policy/echo: throughput {policy.rate / echo.rate:.2f}, "
          f"p50 latency {policy.quantile(0.5) / echo.quantile(0.5):.2f}x, "
          f"p99 latency {policy.quantile(0.99) / echo.quantile(0.99):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
