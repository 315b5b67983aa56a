"""``python -m rempart.imap_pop`` as a process: settings from the environment, ops port,
a real login, and draining on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request

import grpc
import pytest
from imappop_helpers import BOB, BOB_PASSWORD, AuthServicer, PolicyServicer, raw_connect

from rempart.common.pb.auth.v1 import auth_pb2_grpc
from rempart.common.pb.policy.v1 import policy_pb2_grpc
from rempart.common.testing.localstack import free_port, wait_for_port
from rempart.imap_pop import replies as R


@pytest.mark.timeout(60)
async def test_main_serves_and_drains_on_sigterm(redis_url, nats_url, tls_files) -> None:  # type: ignore[no-untyped-def]
    grpc_server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(), grpc_server)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(), grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    ports = {name: free_port() for name in ("imap", "imaps", "pop3", "pop3s", "ops")}
    env = dict(os.environ) | {
        "REMPART_REDIS_URL": redis_url, "REMPART_NATS_URL": nats_url, "REMPART_LISTEN_HOST": "127.0.0.1",
        "REMPART_IMAP_PORT": str(ports["imap"]), "REMPART_IMAPS_PORT": str(ports["imaps"]),
        "REMPART_POP3_PORT": str(ports["pop3"]), "REMPART_POP3S_PORT": str(ports["pop3s"]),
        "REMPART_OPS_PORT": str(ports["ops"]), "REMPART_OPS_HOST": "127.0.0.1",
        "REMPART_POLICY_TARGET": f"127.0.0.1:{grpc_port}", "REMPART_AUTH_TARGET": f"127.0.0.1:{grpc_port}",
        "REMPART_TLS_CERT_FILE": tls_files[0], "REMPART_TLS_KEY_FILE": tls_files[1],
        "REMPART_SHUTDOWN_GRACE_SECONDS": "3", "REMPART_LOG_FORMAT": "text",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rempart.imap_pop", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        for name in ("imap", "pop3", "imaps", "pop3s"):
            await asyncio.to_thread(wait_for_port, "127.0.0.1", ports[name], 20.0)

        def session() -> tuple[bytes, list[bytes], object]:
            raw = raw_connect(ports["imap"])
            greeting = raw.line()
            raw.send(f'a LOGIN {BOB} "{BOB_PASSWORD}"\r\n'.encode())
            login = raw.until(b"a ")
            return greeting, login, raw

        greeting, login, raw = await asyncio.to_thread(session)
        assert greeting.startswith(b"* OK [CAPABILITY ")
        assert login[-1].startswith(b"a OK")
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{ports['ops']}/metrics", timeout=5).read()
        )
        assert b'rempart_edge_logins_total{protocol="imap",result="ok"} 1.0' in metrics
        assert b"rempart_imap_sessions_total " in metrics  # wait_for_port opened sessions too
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(raw.line) == R.IMAP_BYE_SHUTDOWN.encode()  # type: ignore[attr-defined]
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await grpc_server.stop(None)
