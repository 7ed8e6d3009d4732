"""tq+sentinel:// against a private Sentinel group (a primary, a replica and one or three
sentinels, all ``redis-server`` processes on free ports): real ``celery worker`` processes run
tasks through it and follow a failover in the middle of a stream of tasks; kombu-level, every
script path works on the new primary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from celery_tq.transport import redis as tq_redis
from celery_tq.transport import register_transports
from tests.integration.redis_runs import Run, check_complete, send
from tests.private_redis import PrivateSentinels

OPTIONS = {"master_name": "mymaster"}
ENV = {"RT_TRANSPORT_OPTIONS": json.dumps(OPTIONS)}
WINDOW = 2 * 4  # concurrency x worker_prefetch_multiplier of the recording app


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[Callable[..., PrivateSentinels]]:
    groups: list[PrivateSentinels] = []

    def make(count: int = 1) -> PrivateSentinels:
        directory = tmp_path / f"sentinels{len(groups)}"
        directory.mkdir()
        group = PrivateSentinels(directory, count)
        groups.append(group)
        return group.start()

    yield make
    for group in groups:
        group.stop()


def script_reloads(port: int) -> tuple[int, int]:
    """(NOSCRIPT replies, SCRIPT LOAD calls) of the server on ``port``."""
    with redis.Redis(port=port) as client:
        noscript = client.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0)
        loads = client.info("commandstats").get("cmdstat_script|load", {}).get("calls", 0)
    return int(noscript), int(loads)


def test_worker_runs_tasks_through_three_sentinels(
    sentinels: Callable[..., PrivateSentinels], run_factory: Callable[..., Run]
) -> None:
    group = sentinels(3)
    for process in group.sentinels[:2]:  # only the URL's last entry is left to ask
        process.kill()
        process.wait(10)
    run = run_factory(group.url, env=ENV)
    run.worker()
    send(group.url, 50, transport_options=OPTIONS)
    check_complete(run.wait_done(50, timeout=30), 50, window=0)
    with redis.Redis(port=group.primary.port) as primary:
        assert primary.scard("_tq.consumers") >= 1  # the reliable fetch ran on the primary


def failover_mid_stream(
    group: PrivateSentinels, run: Run, switch: Callable[[], int], n: int = 600, m: int = 100
) -> tuple[list[tuple[int, bool]], int, int]:
    """Tasks 0..n-1 queued (and replicated), a worker started, ``switch`` once a quarter ran,
    then tasks n..n+m-1 sent to the new primary. Returns (records, new primary, executions
    while ``switch`` ran)."""
    send(group.url, n, sleep=0.02, transport_options=OPTIONS)
    group.wait_replicated(group.primary.port)
    worker = run.worker()
    run.wait_count(n // 4)
    before = len(run.records())
    new = switch()
    during = len(run.records()) - before
    send(group.url, m, sleep=0.02, first=n, transport_options=OPTIONS)
    records = run.wait_done(n + m, timeout=45)
    assert worker.process is not None and worker.process.poll() is None, worker.log[-3000:]
    return records, new, during


def test_sentinel_failover_mid_stream_worker_follows_the_new_primary(
    sentinels: Callable[..., PrivateSentinels], run_factory: Callable[..., Run]
) -> None:
    group = sentinels()
    run = run_factory(group.url, env=ENV)
    records, new, during = failover_mid_stream(group, run, lambda: group.failover(pause_writes=False))
    # Nothing is lost. Sentinel promotes the replica without stopping the old primary: what the
    # worker acknowledged there until it was demoted is lost with it, so those tasks run again.
    check_complete(records, 700, window=during + 2 * WINDOW)
    noscript, loads = script_reloads(new)
    assert noscript >= 1 and loads >= 1, "the scripts were not loaded again on the new primary"


def test_primary_killed_mid_stream_replica_promoted_nothing_lost(
    sentinels: Callable[..., PrivateSentinels], run_factory: Callable[..., Run]
) -> None:
    group = sentinels()
    run = run_factory(group.url, env=ENV)
    records, new, _ = failover_mid_stream(group, run, group.kill_primary)
    # Celery drops its reserved copies on reconnect: up to two prefetch windows run again.
    check_complete(records, 700, window=2 * WINDOW)
    assert script_reloads(new) >= (1, 1)


def test_every_script_path_works_on_the_new_primary(sentinels: Callable[..., PrivateSentinels]) -> None:
    register_transports()
    group = sentinels()
    options: dict[str, Any] = {**OPTIONS, "heartbeat_interval": 0.2, "recover_interval": 0.2}
    queue = Queue("fo", Exchange("fo"), "fo")
    with Connection(group.url, transport_options=options) as conn:
        channel = conn.default_channel
        producer = conn.Producer(channel)
        for body in ("a", "b"):
            producer.publish(body, exchange="fo", routing_key="fo", declare=[queue])
        queue(channel).get().ack()  # FETCH; the heartbeat thread flushes the ack and runs RECOVER
        with redis.Redis(port=group.primary.port) as primary:
            deadline = time.monotonic() + 10
            while primary.keys("_tq.proc.*") and time.monotonic() < deadline:
                time.sleep(0.05)
        group.wait_replicated(group.primary.port)
        with redis.Redis(port=group.replica.port) as replica:
            assert replica.script_exists(tq_redis.FETCH.sha) == [False]  # scripts are not replicated
        new = group.failover(pause_writes=False)  # the old primary drops every client
        message = queue(channel).get()  # FETCH: reconnects, NOSCRIPT, SCRIPT LOAD
        assert message is not None and message.payload == "b"
        message.requeue()  # RESTORE
        message = queue(channel).get()
        assert message is not None and message.payload == "b" and message.delivery_info["redelivered"]
        with redis.Redis(port=new) as primary:
            deadline = time.monotonic() + 10
            while not primary.exists(f"_tq.hb.{channel._tq_cid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert primary.exists(f"_tq.hb.{channel._tq_cid}"), "the heartbeat did not follow the failover"
    with redis.Redis(port=new) as primary:  # closing ran ADOPT: the unacked "b" is back in its queue
        assert primary.llen("fo") == 1
        assert not primary.keys("_tq.proc.*")
    assert script_reloads(new) >= (1, 1)


def test_a_fetch_connection_on_the_demoted_primary_is_a_connection_error_not_a_loop(
    sentinels: Callable[..., PrivateSentinels], monkeypatch: pytest.MonkeyPatch
) -> None:
    register_transports()
    group = sentinels()
    old = group.primary.port
    queue = Queue("ro", Exchange("ro"), "ro")
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append(body)
        message.ack()

    with (
        Connection(group.url, transport_options=OPTIONS) as conn,
        conn.Consumer([queue], callbacks=[on_message]),
    ):
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.3)  # the event loop's fetch connection waits on the primary
        group.failover(pause_writes=False)
        with pytest.raises(redis.ConnectionError):
            conn.drain_events(timeout=5)  # the demoted primary dropped it
        # A sentinel still naming the old primary when the fetch connection reconnects, which
        # has no scripts there (a replica's full sync, a restart): NOSCRIPT must not loop.
        proxy = conn.default_channel.async_pool.proxy
        monkeypatch.setattr(proxy, "get_master_address", lambda: ("127.0.0.1", old))
        with redis.Redis(port=old) as demoted:
            demoted.script_flush()
        with pytest.raises(redis.ConnectionError, match="previous master"):  # Celery reconnects
            conn.drain_events(timeout=5)
    # Celery's reconnect: a new connection finds the new primary
    with (
        Connection(group.url, transport_options=OPTIONS) as conn,
        conn.Producer() as producer,
        conn.Consumer([queue], callbacks=[on_message]),
    ):
        producer.publish("after", exchange="ro", routing_key="ro", declare=[queue])
        conn.drain_events(timeout=5)
    assert got == ["after"]
