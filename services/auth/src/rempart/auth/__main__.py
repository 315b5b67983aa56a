"""``python -m rempart.auth``: the auth gRPC service."""

from __future__ import annotations

import asyncio

from rempart.auth.server import serve
from rempart.auth.settings import AuthSettings


def main() -> None:
    asyncio.run(serve(AuthSettings()))


if __name__ == "__main__":
    main()
