"""Rebuild the Redis mailbox index from the MAIL stream and the mailbox change log (DESIGN.md
"The mailbox").

    python -m rempart.common.reindex        # reads REMPART_REDIS_URL and REMPART_NATS_URL

Flushes every mailbox's index and replays the delivery records and the change log: folders come
back with their UIDVALIDITY, messages with their UIDs and flags, and subscriptions and special
uses with them. Only a folder holding mail that no filing record names (it arrived just before
the index was lost) gets a new UIDVALIDITY (RFC 3501 2.3.1.1), recorded in the log. Run it with
the edges stopped or draining, after a Redis loss.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from rempart.common.events import connect_nats, ensure_streams
from rempart.common.mailbox import Mailboxes, MailboxLog, rebuild_index
from rempart.common.mailstore import MailboxIndex, MessageStore
from rempart.common.redisconn import connect_redis
from rempart.common.settings import ServiceSettings
from rempart.common.telemetry import setup_logging

log = logging.getLogger("rempart.reindex")


async def run(settings: ServiceSettings) -> int:
    redis = connect_redis(settings.redis_url)
    nc = await connect_nats(settings.nats_url, "rempart-reindex")
    try:
        js = nc.jetstream(timeout=30)
        await ensure_streams(js, settings.stream_replicas)
        mailboxes = Mailboxes(await MessageStore.open(js), MailboxIndex(redis), MailboxLog(js))
        applied = await rebuild_index(js, mailboxes)
        log.info("mailbox index rebuilt", extra={"messages_indexed": applied})
        return applied
    finally:
        await nc.close()
        await redis.aclose()


def main() -> int:
    settings = ServiceSettings()
    setup_logging("reindex", settings.log_level, settings.log_format)
    applied = asyncio.run(run(settings))
    sys.stdout.write(f"rebuilt the mailbox index: {applied} messages\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
