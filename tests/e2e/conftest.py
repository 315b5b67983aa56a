"""The e2e harness: the five services as processes, with the chart's environment."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rempart.common.testing.devstack import AdminApi, Stack, bootstrap_demo


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir: Path = tmp_path_factory.mktemp("stack")
    stack = Stack(workdir=workdir)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def demo(stack: Stack) -> dict[str, str]:
    return bootstrap_demo(stack)


@pytest.fixture(scope="session")
def _admin_session(stack: Stack, demo: dict[str, str]) -> AdminApi:
    # After `demo`: bootstrap_demo waits until the admin API has created the bootstrap admin.
    api = AdminApi(f"http://127.0.0.1:{stack.ports['admin-api.http']}")
    api.login(stack.admin_email, stack.admin_password)
    return api


@pytest.fixture
def admin(stack: Stack, _admin_session: AdminApi) -> AdminApi:
    """A superadmin session. Admin logins need a fresh TOTP code each (R-2FA-1), so the tests share
    one session and log in again only when a test ended it."""
    api = AdminApi(_admin_session.base_url)
    api.token = _admin_session.token
    status, _ = api.call("GET", "/v1/me")
    if status != 200:
        api.login(stack.admin_email, stack.admin_password)
        _admin_session.token = api.token
    return api
