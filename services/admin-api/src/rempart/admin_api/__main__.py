"""``python -m rempart.admin_api``."""

from __future__ import annotations

import asyncio

from rempart.admin_api.service import serve
from rempart.admin_api.settings import AdminApiSettings


def main() -> None:
    asyncio.run(serve(AdminApiSettings()))


if __name__ == "__main__":
    main()
