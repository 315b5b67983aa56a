"""The e2e harness: the five services as processes, with the chart's environment."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rempart.common.devstack import AdminApi, Stack, bootstrap_demo


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


@pytest.fixture
def admin(stack: Stack) -> AdminApi:
    api = AdminApi(f"http://127.0.0.1:{stack.ports['admin-api.http']}")
    api.login(stack.admin_email, stack.admin_password)
    return api
