"""run_scripts: Lua script calls and plain commands in one round trip, over a real Redis."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from rempart.common.redisconn import run_scripts

INCR_BY = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


class Counting(aioredis.Redis):
    """Counts the pipelines sent (each is one round trip)."""

    pipelines = 0

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        Counting.pipelines += 1
        return super().pipeline(transaction, shard_hint)


async def test_scripts_and_commands_in_one_round_trip_and_reloaded_after_a_script_flush(
        redis: aioredis.Redis, redis_url: str) -> None:
    client = Counting.from_url(redis_url, decode_responses=True)
    try:
        script = client.register_script(INCR_BY)
        await client.delete("t:a", "t:b", "t:c")
        Counting.pipelines = 0
        results = await run_scripts(client, [(script, ["t:a"], [2]), (script, ["t:b"], [3])],
                                    before=lambda pipe: pipe.set("t:c", "x"))
        # NOSCRIPT (never loaded): loaded, then the whole pipeline again; SET is idempotent.
        assert results == [True, 2, 3] and Counting.pipelines == 2
        Counting.pipelines = 0
        assert await run_scripts(client, [(script, ["t:a"], [5])]) == [7]
        assert Counting.pipelines == 1, "a loaded script costs no SCRIPT EXISTS round trip"
        await redis.script_flush()  # a restarted Redis forgot it
        assert await run_scripts(client, [(script, ["t:b"], [1])]) == [4]
        assert await redis.get("t:c") == "x"
    finally:
        await client.aclose()
