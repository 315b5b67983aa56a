"""Rebuild the Redis mailbox index from the MAIL stream (DESIGN.md "Durability").

    python -m rempart.common.reindex        # reads REMPART_REDIS_URL and REMPART_NATS_URL

Flushes every mailbox's index and replays the delivery, append and expunge records in stream
order. UIDs are reassigned, so every folder gets a new, larger UIDVALIDITY (RFC 3501 2.3.1.1):
clients resynchronise instead of showing wrong messages. Flags are Redis state and start empty.
Run it with the edges stopped or draining, after a Redis loss.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from rempart.common.events import connect_nats, ensure_streams
from rempart.common.mailstore import MailboxIndex, rebuild_index
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
        applied = await rebuild_index(js, MailboxIndex(redis))
        log.info("mailbox index rebuilt", extra={"records_applied": applied})
        return applied
    finally:
        await nc.close()
        await redis.aclose()


def main() -> int:
    settings = ServiceSettings()
    setup_logging("reindex", settings.log_level, settings.log_format)
    applied = asyncio.run(run(settings))
    sys.stdout.write(f"rebuilt the mailbox index from {applied} delivery records\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
