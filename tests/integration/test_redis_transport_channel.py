"""The tq+redis:// transport against a real Redis (this suite's unit db of the shared server,
flushed around each test; a private redis-server for the Cluster refusal and for Redis going
away), driven through kombu directly."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from celery_tq.errors import ConfigurationError
from celery_tq.transport import redis as tq_redis
from celery_tq.transport import register_transports
from tests.conftest import REDIS_UNIT_DB, service_missing
from tests.private_redis import PrivateRedis

DB = REDIS_UNIT_DB
STEPS = list(range(10))


@pytest.fixture
def db(redis_host: str) -> Iterator[str]:
    register_transports()
    client = redis.Redis.from_url(f"redis://{redis_host}/{DB}")
    client.flushdb()
    yield f"tq+redis://{redis_host}/{DB}"
    client.flushdb()
    client.close()


@pytest.fixture
def raw(redis_host: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"redis://{redis_host}/{DB}")
    yield client
    client.close()


def opts(**extra: Any) -> dict[str, Any]:
    return {
        "priority_steps": STEPS,
        "heartbeat_ttl": 2,
        "heartbeat_interval": 0.5,
        "recover_interval": 0.5,
        **extra,
    }


def queue(name: str) -> Queue:
    return Queue(name, Exchange(name), name)


def publish(conn: Connection, name: str, bodies: list[Any], priority: int = 0) -> None:
    with conn.Producer() as producer:
        for body in bodies:
            producer.publish(body, exchange=name, routing_key=name, declare=[queue(name)], priority=priority)


def consume(conn: Connection, names: list[str], count: int, ack: bool = True, prefetch: int = 1) -> list[Any]:
    """Bodies (and messages, unacked if ``ack`` is False) in delivery order."""
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append((body, message))
        if ack:
            message.ack()

    with conn.Consumer([queue(n) for n in names], callbacks=[on_message], prefetch_count=prefetch):
        deadline = time.monotonic() + 20
        while len(got) < count and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)
    return got


def test_stock_producer_to_tq_consumer_and_back(db: str, redis_host: str) -> None:
    stock_url = f"redis://{redis_host}/{DB}"
    with Connection(stock_url, transport_options={"priority_steps": STEPS}) as stock:
        publish(stock, "interop", [{"n": 1}, {"n": 2}])
    with Connection(db, transport_options=opts()) as tq:
        assert isinstance(tq.transport, tq_redis.Transport)
        assert [b for b, _ in consume(tq, ["interop"], 2)] == [{"n": 1}, {"n": 2}]
        publish(tq, "interop", [{"n": 3}], priority=2)
    with Connection(stock_url, transport_options={"priority_steps": STEPS}) as stock:
        assert isinstance(stock.transport, kombu_redis.Transport)
        assert [b for b, _ in consume(stock, ["interop"], 1)] == [{"n": 3}]
        # `celery purge` is kombu's _purge on the same keys
        publish(stock, "interop", [{"n": 4}])
    with Connection(db, transport_options=opts()) as tq, tq.channel() as channel:
        publish(tq, "interop", [{"n": 5}], priority=7)
        assert channel.queue_purge("interop") == 2


def test_priorities_strict_across_two_queues_fifo_and_round_robin(db: str) -> None:
    with Connection(db, transport_options=opts()) as conn:
        # kombu's Redis convention: step 0 is served first (celery_tq inverts 9 - p for it)
        publish(conn, "qa", ["a5-1", "a5-2"], priority=5)
        publish(conn, "qb", ["b5-1", "b5-2"], priority=5)
        publish(conn, "qb", ["b9"], priority=9)
        publish(conn, "qa", ["a0"], priority=0)
        publish(conn, "qb", ["b0"], priority=0)
        order = [b for b, _ in consume(conn, ["qa", "qb"], 7, prefetch=10)]
    assert sorted(order[:2]) == ["a0", "b0"]
    level5 = order[2:6]
    assert sorted(level5) == ["a5-1", "a5-2", "b5-1", "b5-2"]
    assert level5.index("a5-1") < level5.index("a5-2") and level5.index("b5-1") < level5.index("b5-2")
    assert {level5[0][0], level5[1][0]} == {"a", "b"}  # round-robin between queues of a level
    assert order[6] == "b9"


def test_ack_empties_processing_list_close_requeues_unacked_at_front(db: str, raw: redis.Redis) -> None:
    with Connection(db, transport_options=opts()) as conn:
        publish(conn, "acks", [1, 2, 3, 4])
        got = consume(conn, ["acks"], 1, ack=True)
        assert [b for b, _ in got] == [1]
        got = consume(conn, ["acks"], 2, ack=False, prefetch=2)
        assert [b for b, _ in got] == [2, 3]
    # the unacked 2, 3 went back in front of 4, marked redelivered; nothing left in flight
    assert not [k for k in raw.keys("_tq.proc.*")]
    assert not raw.smembers("_tq.consumers")
    with Connection(db, transport_options=opts()) as conn:
        got = consume(conn, ["acks"], 3)
        assert [b for b, _ in got] == [2, 3, 4]
        assert [m.delivery_info.get("redelivered", False) for _, m in got] == [True, True, False]


def test_reject_requeue_goes_to_the_front_marked_redelivered(db: str) -> None:
    with Connection(db, transport_options=opts()) as conn:
        publish(conn, "rej", ["x", "y"])
        (body, message), *_ = consume(conn, ["rej"], 1, ack=False)
        assert body == "x"
        message.reject(requeue=True)
        got = consume(conn, ["rej"], 2)
    assert [b for b, _ in got] == ["x", "y"]
    assert got[0][1].delivery_info["redelivered"] is True


def test_dead_consumer_recovered_to_front_live_one_never(db: str, raw: redis.Redis) -> None:
    with Connection(db, transport_options=opts()) as live, Connection(db, transport_options=opts()) as dying:
        publish(live, "rec", ["held", "lost", "rest"])
        held = consume(live, ["rec"], 1, ack=False)
        assert [b for b, _ in held] == ["held"]
        lost = consume(dying, ["rec"], 1, ack=False)
        assert [b for b, _ in lost] == ["lost"]
        # simulate kill -9 of `dying`: its heartbeat stops, nothing is restored by it
        channel = lost[0][1].channel
        channel._tq_stop.set()
        channel._tq_pid = -1
        raw.delete(f"_tq.hb.{channel._tq_cid}")
        deadline = time.monotonic() + 20
        while raw.llen("rec") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # the live consumer's heartbeat thread runs RECOVER
        time.sleep(2.5)  # > heartbeat_ttl: the live consumer's "held" must still be its own
        assert raw.llen(f"_tq.proc.{held[0][1].channel._tq_cid}|rec") == 1
        got = consume(live, ["rec"], 2, prefetch=3)
        assert [b for b, _ in got] == ["lost", "rest"]
        assert got[0][1].delivery_info["redelivered"] is True
        held[0][1].ack()


def test_fetch_reply_lost_with_the_connection_is_requeued(db: str, raw: redis.Redis) -> None:
    with Connection(db, transport_options=opts()) as conn:
        publish(conn, "lost", ["a", "b"])
        channel = conn.default_channel
        # a fetch whose reply never arrived: the messages are in our processing list, unheld
        tq_redis.FETCH(channel._tq_client(), channel._tq_fetch_args(["lost"], 2, []))
        assert raw.llen("lost") == 0
        channel._tq_rotate = True  # what a dropped fetch connection sets
        got = consume(conn, ["lost"], 2)
    assert [b for b, _ in got] == ["a", "b"]
    assert all(m.delivery_info["redelivered"] for _, m in got)


def test_idle_consumer_wakes_on_the_marker_not_the_fallback_poll(db: str) -> None:
    # polling_interval (the fallback for producers without markers) is 30 s here
    with Connection(db, transport_options=opts(polling_interval=30)) as conn:
        got: list[Any] = []
        q = queue("wake")
        with conn.Consumer([q], callbacks=[lambda body, m: (got.append(body), m.ack())], prefetch_count=1):
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.5)  # now blocked on the wake-up marker
            publish(conn, "wake", ["ping"])
            conn.drain_events(timeout=10)
    assert got == ["ping"]


def test_global_keyprefix_is_honoured(db: str, raw: redis.Redis, redis_host: str) -> None:
    with Connection(db, transport_options=opts(global_keyprefix="app1:")) as conn:
        publish(conn, "pre", ["p"])
        assert raw.llen("app1:pre") == 1
        got = consume(conn, ["pre"], 1, ack=False)
        assert got[0][0] == "p"
        assert raw.keys("_tq*") == []
        assert raw.exists(f"app1:_tq.proc.{got[0][1].channel._tq_cid}|pre")
    stock = f"redis://{redis_host}/{DB}"
    with Connection(stock, transport_options={"priority_steps": STEPS, "global_keyprefix": "app1:"}) as conn:
        assert [b for b, _ in consume(conn, ["pre"], 1)] == ["p"]


def test_sentinel_options_on_tq_redis_point_to_tq_sentinel(db: str) -> None:
    conn = Connection(db, transport_options={"master_name": "mymaster"})
    with conn, pytest.raises(ConfigurationError, match=r"for Sentinel use tq\+sentinel://"):
        conn.default_channel  # noqa: B018


def test_redis_cluster_refused_clearly(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        service_missing("redis-server", "not installed")
    register_transports()
    server = PrivateRedis(tmp_path, extra_args=["--cluster-enabled", "yes"])
    server.start()
    try:
        conn = Connection(f"tq+redis://127.0.0.1:{server.port}/0")
        with conn, pytest.raises(ConfigurationError, match="Cluster"):
            conn.default_channel  # noqa: B018
    finally:
        server.stop()


def test_a_silent_heartbeat_severs_the_link_then_fences_the_channel(db: str) -> None:
    with Connection(db, transport_options=opts()) as conn:  # heartbeat_ttl 2 s
        channel = conn.default_channel
        publish(conn, "cut", ["late"])
        try:
            channel._tq_watch_link(1.5)  # > ttl / 2: the link looks frozen
            assert channel._tq_severed and not channel._tq_fenced
            with pytest.raises(redis.exceptions.ConnectionError, match="looks frozen"):
                channel._tq_client()  # fails at once rather than waiting on a connect
            with pytest.raises(tq_redis.LinkFrozen), channel.conn_or_acquire():
                pass  # a publish: not a connection error, so kombu's ensure() does not spin on it
            channel._tq_watch_link(2.5)  # > ttl: others may have recovered what it held
            assert channel._tq_fenced
            tq_redis._frozen_links.clear()  # a beat got through again
            with pytest.raises(redis.exceptions.ConnectionError, match="fenced"):
                channel._get("cut")
            reply = tq_redis.FETCH(channel._tq_client(), channel._tq_fetch_args(["cut"], 1, []))
            channel._tq_deliver(reply[0].decode(), reply[1])  # a fetch reply arriving late
            assert channel._tq_held == {} and not channel.qos._delivered
        finally:
            tq_redis._frozen_links.clear()


def test_a_missed_heartbeat_is_a_warning_saying_what_may_follow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis goes away under a consumer: the first missed beat is a WARNING (another worker may
    recover this worker's messages), later misses are not repeated, and the return is said."""
    if shutil.which("redis-server") is None:
        service_missing("redis-server", "not installed")
    register_transports()
    server = PrivateRedis(tmp_path)
    server.start()

    def messages(text: str, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage() and r.levelno >= level]

    def wait_for(text: str, count: int = 1, level: int = logging.WARNING) -> list[str]:
        deadline = time.monotonic() + 20
        while len(messages(text, level)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return messages(text, level)

    url = f"tq+redis://127.0.0.1:{server.port}/0"
    try:
        with (
            caplog.at_level(logging.DEBUG, logger="celery_tq.transport.redis"),
            Connection(url, transport_options=opts(heartbeat_ttl=30, heartbeat_interval=0.2)) as conn,
        ):
            publish(conn, "hb", ["a"])
            assert [b for b, _ in consume(conn, ["hb"], 1)] == ["a"]  # the heartbeat thread runs
            server.kill()
            assert len(wait_for("missed: Redis", count=3, level=logging.DEBUG)) >= 3
            [missed] = messages("missed: Redis")  # three beats missed, one warning
            assert f"Redis 127.0.0.1:{server.port} did not take it" in missed
            assert "another worker may recover this worker's unacked messages" in missed
            server.start()
            [back] = wait_for("again after")
            assert f"reached Redis 127.0.0.1:{server.port} again" in back
    finally:
        server.stop()
