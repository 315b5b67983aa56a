"""``python -m rempart.policy``: the policy gRPC service."""

from __future__ import annotations

from rempart.common import runtime
from rempart.policy.app import serve
from rempart.policy.settings import PolicySettings


def main() -> None:
    runtime.run(serve(PolicySettings()))


if __name__ == "__main__":
    main()
