"""Helpers for tests, benchmarks and ``make run``, never imported by a service: local Redis and
NATS servers on free ports (localstack), the whole suite as processes (devstack), a real DNS
server on loopback (dnsserver), and polling with a deadline (polling). The service images leave
this package out (libs/common/pyproject.toml)."""
