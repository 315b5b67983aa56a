"""The open SMTP connections of this replica, by client IP: the session budget, and closing every
connection a block covers wherever the block was decided (R-IPS-4)."""

from __future__ import annotations

from prometheus_client import Counter

from rempart.common import metrics
from rempart.common.ipblocks import BlockedScope
from rempart.smtp_edge.session import EdgeSMTP

SESSIONS = Counter("rempart_smtp_sessions_total", "SMTP sessions opened", ["listener"])


class ConnectionRegistry:
    def __init__(self) -> None:
        self._by_ip: dict[str, set[EdgeSMTP]] = {}

    def register(self, server: EdgeSMTP) -> None:
        metrics.child(SESSIONS, server.listener.name).inc()
        self._by_ip.setdefault(server.state.client_ip, set()).add(server)

    def unregister(self, server: EdgeSMTP) -> None:
        peers = self._by_ip.get(server.state.client_ip)
        if peers is not None:
            peers.discard(server)
            if not peers:
                del self._by_ip[server.state.client_ip]

    def moved(self, server: EdgeSMTP, client_ip: str, client_port: int) -> None:
        """The session's client is another address than its TCP peer (a PROXY header)."""
        self.unregister(server)
        server.state.client_ip, server.state.client_port = client_ip, client_port
        self._by_ip.setdefault(client_ip, set()).add(server)

    def __len__(self) -> int:
        return sum(len(peers) for peers in self._by_ip.values())

    def close_ip(self, scope: BlockedScope | str, reply: str) -> int:
        """Send ``reply`` and close every connection of ``scope`` (an IP, or a block's scope)."""
        if isinstance(scope, str):
            scope = BlockedScope(ip=scope, prefix="")
        closed = 0
        for ip in [ip for ip in self._by_ip if scope.covers(ip)]:
            for server in list(self._by_ip.get(ip, ())):
                if server.close_with(reply):
                    closed += 1
        return closed

    def close_idle(self, reply: str, idle_seconds: float) -> int:
        """Send ``reply`` and close every connection quiet between two transactions for
        ``idle_seconds`` (a draining edge: nothing in flight is cut)."""
        closed = 0
        for peers in list(self._by_ip.values()):
            for server in list(peers):
                if server.between_transactions(idle_seconds) and server.close_with(reply):
                    closed += 1
        return closed

    def close_all(self, reply: str) -> int:
        return sum(self.close_ip(ip, reply) for ip in list(self._by_ip))
