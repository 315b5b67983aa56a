"""One policy stream per SMTP session (issue 11): verdicts in order, fail closed when the stream
breaks or is late, a fresh stream for the next stage, and unary calls against an older policy
service. Real gRPC on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from rempart.common.clients import PolicyClient
from rempart.common.pb.policy.v1 import policy_pb2, policy_pb2_grpc


class Policy(policy_pb2_grpc.PolicyServiceServicer):  # type: ignore[misc]
    def __init__(self, streams: bool = True) -> None:
        self.streams = streams
        self.opened = 0
        self.unary = 0
        self.break_on: str = ""  # a recipient that kills the stream
        self.stall_on: str = ""  # a recipient answered too late

    def _verdict(self, request: policy_pb2.CheckRequest) -> policy_pb2.Verdict:
        return policy_pb2.Verdict(action=policy_pb2.ACTION_ACCEPT, code=250, text=request.recipient or "ok")

    async def Check(self, request: policy_pb2.CheckRequest, context: Any) -> policy_pb2.Verdict:
        self.unary += 1
        return self._verdict(request)

    async def Session(self, requests: Any, context: Any) -> AsyncIterator[policy_pb2.Verdict]:
        if not self.streams:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.opened += 1
        async for request in requests:
            if request.recipient == self.break_on:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            if request.recipient == self.stall_on:
                await asyncio.sleep(1.0)
            yield self._verdict(request)


@pytest.fixture
async def policy_server() -> AsyncIterator[tuple[Policy, str]]:
    servicer = Policy()
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


def rcpt(address: str) -> policy_pb2.CheckRequest:
    return policy_pb2.CheckRequest(stage=policy_pb2.STAGE_RCPT, recipient=address,
                                   session=policy_pb2.SessionFacts(session_id="s1", client_ip="192.0.2.1"))


async def test_a_session_asks_every_stage_over_one_stream_in_order(policy_server: tuple[Policy, str]) -> None:
    servicer, target = policy_server
    client = PolicyClient(target, timeout=0.5)
    session = client.session()
    texts = [(await session.check(rcpt(f"r{n}@example.org"))).text for n in range(50)]
    assert texts == [f"r{n}@example.org" for n in range(50)]
    assert (servicer.opened, servicer.unary) == (1, 0)
    await session.close()
    await client.close()


async def test_a_broken_or_late_stream_fails_the_stage_closed_and_the_next_stage_reconnects(
    policy_server: tuple[Policy, str]
) -> None:
    servicer, target = policy_server
    servicer.break_on, servicer.stall_on = "broken@example.org", "slow@example.org"
    client = PolicyClient(target, timeout=0.5)
    session = client.session()
    assert (await session.check(rcpt("a@example.org"))).action == policy_pb2.ACTION_ACCEPT
    broken = await session.check(rcpt("broken@example.org"))
    assert (broken.action, broken.code, broken.enhanced_code) == (policy_pb2.ACTION_TEMPFAIL, 451, "4.3.0")
    assert (await session.check(rcpt("b@example.org"))).text == "b@example.org"
    late = await session.check(rcpt("slow@example.org"))
    assert late.action == policy_pb2.ACTION_TEMPFAIL
    # The late verdict is never taken for the next stage's: a new stream answers it.
    assert (await session.check(rcpt("c@example.org"))).text == "c@example.org"
    assert servicer.opened == 3
    await session.close()
    await client.close()


async def test_an_older_policy_service_without_streams_is_asked_the_unary_way(
    policy_server: tuple[Policy, str]
) -> None:
    servicer, target = policy_server
    servicer.streams = False
    client = PolicyClient(target, timeout=0.5)
    session = client.session()
    assert (await session.check(rcpt("a@example.org"))).text == "a@example.org"
    assert (await client.session().check(rcpt("b@example.org"))).text == "b@example.org"
    assert servicer.unary == 2
    await client.close()


async def test_policy_down_is_a_tempfail_never_an_accept() -> None:
    from rempart.common.testing.localstack import free_port

    client = PolicyClient(f"127.0.0.1:{free_port()}", timeout=0.5)
    verdict = await client.session().check(rcpt("a@example.org"))
    assert (verdict.action, verdict.code) == (policy_pb2.ACTION_TEMPFAIL, 451)
    await client.close()
