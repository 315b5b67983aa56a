"""Process settings: the documented ports, and unsafe defaults refused in production."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rempart.auth.settings import AuthSettings


def test_default_ports_and_argon2_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REMPART_GRPC_PORT", "REMPART_OPS_PORT", "REMPART_ARGON2_TIME_COST", "REMPART_ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    settings = AuthSettings()
    assert (settings.grpc_port, settings.ops_port) == (50052, 9104)
    assert (settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism) == (3, 65536, 1)


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMPART_GRPC_PORT", "6000")
    monkeypatch.setenv("REMPART_ARGON2_MEMORY_KIB", "2048")
    settings = AuthSettings()
    assert (settings.grpc_port, settings.argon2_memory_kib) == (6000, 2048)


def test_production_refuses_the_dev_secret_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMPART_SECRET_KEY", raising=False)
    with pytest.raises(ValidationError):
        AuthSettings(environment="prod")
