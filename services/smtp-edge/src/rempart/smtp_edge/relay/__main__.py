"""``python -m rempart.smtp_edge.relay``: the outbound relay."""

from __future__ import annotations

from rempart.common import runtime
from rempart.smtp_edge.relay.app import serve
from rempart.smtp_edge.relay.settings import RelaySettings


def main() -> None:
    runtime.run(serve(RelaySettings()))


if __name__ == "__main__":
    main()
