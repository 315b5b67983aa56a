"""``python -m rempart.smtp_edge``: the SMTP edge (MX, submission, SMTPS)."""

from __future__ import annotations

from rempart.common import runtime
from rempart.smtp_edge.app import serve
from rempart.smtp_edge.settings import SmtpEdgeSettings


def main() -> None:
    runtime.run(serve(SmtpEdgeSettings()))


if __name__ == "__main__":
    main()
