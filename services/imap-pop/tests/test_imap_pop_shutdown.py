"""SIGTERM ends ``python -m rempart.imap_pop`` promptly however its NATS is doing (issue 8 §1).

Its own NATS server per test, so that the test can stop or freeze it: gone (the process was
stopped), frozen (SIGSTOP: the TCP connection stays open and nothing answers) and never there
(the service is still retrying its first connection when the signal comes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rempart.common.testing.localstack import LocalServer, free_port, start_nats, wait_for_port

# make run gives a service 6 s after SIGTERM (devstack.SERVICE_STOP_GRACE); the drain grace is 1 s here.
EXIT_WITHIN_SECONDS = 6.0


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[LocalServer]:
    server = start_nats(tmp_path / "nats")
    yield server
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)  # in case the test froze it
    server.stop()


def start_imap_pop(redis_url: str, nats_url: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    imap_port, ops_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMPART_")} | {
        "REMPART_ENVIRONMENT": "dev", "REMPART_REDIS_URL": redis_url, "REMPART_NATS_URL": nats_url,
        "REMPART_LISTEN_HOST": "127.0.0.1", "REMPART_IMAP_PORT": str(imap_port),
        "REMPART_IMAPS_PORT": str(free_port()), "REMPART_POP3_PORT": str(free_port()),
        "REMPART_POP3S_PORT": str(free_port()), "REMPART_OPS_HOST": "127.0.0.1",
        "REMPART_OPS_PORT": str(ops_port), "REMPART_SHUTDOWN_GRACE_SECONDS": "1",
        "REMPART_LOG_FORMAT": "text",
    }
    log = tmp_path / "imap-pop.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rempart.imap_pop"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    return proc, imap_port, log


# A failed connection attempt, as logged (asyncio says "Connect call failed", uvloop "Connection refused").
RECONNECT_FAILED = ("Connect call failed", "Connection refused")


def wait_for_log(proc: subprocess.Popen[bytes], log: Path, texts: tuple[str, ...], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in log.read_text(errors="replace") for text in texts):
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.05)


def assert_exits_on_sigterm(proc: subprocess.Popen[bytes], log: Path) -> float:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(EXIT_WITHIN_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(f"imap-pop still running {EXIT_WITHIN_SECONDS}s after SIGTERM:\n{tail}")
    assert code == 0, log.read_text(errors="replace")[-3000:]
    return time.monotonic() - started


@pytest.mark.timeout(60)
@pytest.mark.parametrize("nats_fault", ["gone", "frozen"])
def test_sigterm_exits_when_nats_went_away(redis_url: str, own_nats: LocalServer, tmp_path: Path,
                                           nats_fault: str) -> None:
    proc, imap_port, log = start_imap_pop(redis_url, own_nats.url, tmp_path)
    try:
        wait_for_port("127.0.0.1", imap_port, timeout=30, proc=proc)
        if nats_fault == "gone":
            own_nats.stop()
            # The client notices and starts reconnecting: its first failed attempt is logged.
            wait_for_log(proc, log, RECONNECT_FAILED)
        else:
            os.kill(own_nats.proc.pid, signal.SIGSTOP)
            # Nothing to notice: the connection stays open and silent. A moment for the service's
            # own requests (indexer, settings) to be sent into it and hang.
            time.sleep(0.5)
        assert_exits_on_sigterm(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_sigterm_while_still_connecting_exits_cleanly(redis_url: str, tmp_path: Path) -> None:
    unreachable = f"nats://127.0.0.1:{free_port()}"
    proc, _, log = start_imap_pop(redis_url, unreachable, tmp_path)
    try:
        # Up to the first failed attempt: the service is inside its endless connect retries.
        wait_for_log(proc, log, RECONNECT_FAILED)
        assert assert_exits_on_sigterm(proc, log) < 2.0
        assert "stopped before it was ready" in log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
