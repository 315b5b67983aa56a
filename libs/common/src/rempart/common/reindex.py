"""Rebuild the Redis mailbox index from the MAIL stream and the mailbox change log (DESIGN.md
"The mailbox"), or compact the change log.

    python -m rempart.common.reindex            # reads REMPART_REDIS_URL and REMPART_NATS_URL
    python -m rempart.common.reindex --compact

Without options: flushes every mailbox's index and replays the delivery records and the change
log (each account's snapshot, then its records after it): folders come back with their
UIDVALIDITY, messages with their UIDs and flags, and subscriptions and special uses with them.
Only a folder holding mail that no filing record names (it arrived just before the index was
lost) gets a new UIDVALIDITY (RFC 3501 2.3.1.1), recorded in the log. Run it with the edges
stopped or draining, after a Redis loss.

``--compact``: folds every account's change log into its snapshot, one account at a time, and
purges what was folded (imap-pop does it in the background past REMPART_MAILBOX_COMPACT_RECORDS
records). Safe while the suite runs; it changes nothing a client sees.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from rempart.common.events import connect_nats, ensure_streams
from rempart.common.mailbox import Mailboxes, MailboxLog, rebuild_index
from rempart.common.mailbox_snapshot import SnapshotStore, compact_grown
from rempart.common.mailstore import MailboxIndex, MessageStore
from rempart.common.redisconn import connect_redis
from rempart.common.settings import ServiceSettings
from rempart.common.telemetry import setup_logging

log = logging.getLogger("rempart.reindex")


async def run(settings: ServiceSettings, compact: bool = False) -> int:
    """Rebuild (returns the messages indexed) or, with ``compact``, compact every account's
    change log (returns the accounts compacted)."""
    redis = connect_redis(settings.redis_url)
    nc = await connect_nats(settings.nats_url, "rempart-reindex")
    try:
        js = nc.jetstream(timeout=30)
        await ensure_streams(js, settings.stream_replicas)
        mailboxes = Mailboxes(await MessageStore.open(js), MailboxIndex(redis), MailboxLog(js))
        if compact:
            done = await compact_grown(js, mailboxes, SnapshotStore(js), 0)
            log.info("mailbox change log compacted", extra={"accounts": len(done)})
            return len(done)
        applied = await rebuild_index(js, mailboxes)
        log.info("mailbox index rebuilt", extra={"messages_indexed": applied})
        return applied
    finally:
        await nc.close()
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rempart.common.reindex",
                                     description="Rebuild the mailbox index, or compact the mailbox change log.")
    parser.add_argument("--compact", action="store_true",
                        help="compact every account's change log into its snapshot instead of rebuilding")
    args = parser.parse_args(argv)
    settings = ServiceSettings()
    setup_logging("reindex", settings.log_level, settings.log_format)
    done = asyncio.run(run(settings, args.compact))
    if args.compact:
        sys.stdout.write(f"compacted the change log of {done} accounts\n")
    else:
        sys.stdout.write(f"rebuilt the mailbox index: {done} messages\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
