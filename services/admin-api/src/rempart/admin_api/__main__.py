"""``python -m rempart.admin_api``."""

from __future__ import annotations

from rempart.admin_api.service import serve
from rempart.admin_api.settings import AdminApiSettings
from rempart.common import runtime


def main() -> None:
    runtime.run(serve(AdminApiSettings()))


if __name__ == "__main__":
    main()
