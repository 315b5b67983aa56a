"""Stream settings (R-OPS-6): created with the configured replicas, never lowered by code."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js import api as jsapi

from rempart.common.events import (
    BLOB_BUCKET,
    EVENTS_STREAM,
    MAIL_STREAM,
    MAILBOX_LOG_STREAM,
    MAILBOX_SNAPSHOT_STREAM,
    connect_nats,
    ensure_streams,
)
from rempart.common.testing.localstack import start_nats_cluster

pytestmark = pytest.mark.timeout(90)
STREAMS = (MAIL_STREAM, MAILBOX_LOG_STREAM, MAILBOX_SNAPSHOT_STREAM, EVENTS_STREAM, f"OBJ_{BLOB_BUCKET}")


async def test_r_ops_6_streams_created_r3_on_a_cluster_and_never_lowered(tmp_path: Path) -> None:
    cluster = start_nats_cluster(tmp_path)
    try:
        nc = await connect_nats(",".join(s.url for s in cluster), "test")
        js = nc.jetstream(timeout=10)
        assert await ensure_streams(js, replicas=3) == []
        for name in STREAMS:
            assert (await js.stream_info(name)).config.num_replicas == 3
        # A pod started with the default (1) must leave the operator's R3 alone, and say so.
        differences = await ensure_streams(js, replicas=1)
        assert len(differences) == len(STREAMS) and all("never lowered" in d for d in differences)
        for name in STREAMS:
            assert (await js.stream_info(name)).config.num_replicas == 3
        await nc.close()
    finally:
        for server in cluster:
            server.stop()


async def test_r_ops_6_an_existing_stream_is_raised_and_given_direct_reads(nats_url: str) -> None:
    nc = await connect_nats(nats_url, "test")
    js = nc.jetstream()
    # MAIL as an older release created it: no direct get, operator's own age limit.
    await js.add_stream(jsapi.StreamConfig(name=MAIL_STREAM, subjects=["rempart.mail.>"], max_msgs_per_subject=-1,
                                           storage=jsapi.StorageType.FILE, description="operator's note"))
    differences = await ensure_streams(js, replicas=3)  # one node: R3 cannot be applied
    config = (await js.stream_info(MAIL_STREAM)).config
    assert config.allow_direct is True and config.description == "operator's note"
    assert config.num_replicas == 1
    assert any(MAIL_STREAM in d and "could not apply" in d for d in differences)
    await nc.close()
