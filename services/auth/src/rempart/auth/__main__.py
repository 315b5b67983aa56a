"""``python -m rempart.auth``: the auth gRPC service."""

from __future__ import annotations

from rempart.auth.app import serve
from rempart.auth.settings import AuthSettings
from rempart.common import runtime


def main() -> None:
    runtime.run(serve(AuthSettings()))


if __name__ == "__main__":
    main()
