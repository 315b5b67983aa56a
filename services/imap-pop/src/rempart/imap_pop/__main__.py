"""``python -m rempart.imap_pop``: the IMAP and POP3 service."""

from __future__ import annotations

from rempart.common import runtime
from rempart.imap_pop.app import serve
from rempart.imap_pop.settings import ImapPopSettings


def main() -> None:
    runtime.run(serve(ImapPopSettings()))


if __name__ == "__main__":
    main()
