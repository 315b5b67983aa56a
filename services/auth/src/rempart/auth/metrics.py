"""Prometheus metrics of the auth service (R-OPS-4: dashboards for auth failures)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

KNOWN_PROTOCOLS = frozenset({"smtp", "imap", "pop3", "admin"})

AUTH_ATTEMPTS = Counter(
    "rempart_auth_attempts_total", "Authenticate calls by protocol and result", ["protocol", "result"]
)
HASH_SECONDS = Histogram(
    "rempart_auth_hash_seconds",
    "Time spent computing one Argon2id hash or verification (in a worker thread)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2),
)


def protocol_label(protocol: str) -> str:
    # The protocol comes from the caller: never let it create unbounded label values.
    return protocol if protocol in KNOWN_PROTOCOLS else "other"
