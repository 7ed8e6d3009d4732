"""kombu-level tests of the embedded ``tq+sqlite://`` transport, across processes."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from celery_tq.transport import register_transports, transport_for_url
from celery_tq.transport.sqlite import Transport as SQLiteTransport
from tests.waiting import wait_for

CTX = multiprocessing.get_context("fork")
FAST = {"polling_interval": 0.005, "sweep_interval": 0.2}


@pytest.fixture(autouse=True)
def _registered() -> None:
    register_transports()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"tq+sqlite:///{tmp_path}/sub/broker.db"


def rows(url: str, sql: str, *args: Any) -> list[Any]:
    path = url.removeprefix("tq+sqlite:///")
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def drain(conn: Connection, queue: Queue, idle: float = 0.3, redelivered: bool = False) -> list[Any]:
    """Consume and ack ``queue`` until it stays empty for ``idle`` seconds."""
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        flag = bool(message.delivery_info.get("redelivered"))
        got.append((body, flag) if redelivered else body)
        message.ack()

    with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=10):
        while True:
            try:
                conn.drain_events(timeout=idle)
            except TimeoutError:
                return got


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(5)


def start(procs: list[Any], target: Any, *args: Any) -> Any:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


# -- URL handling and registration -----------------------------------------------------


def test_import_has_no_side_effect_and_register_is_idempotent() -> None:
    code = (
        "import kombu.transport as t, celery_tq.transport as c\n"
        "assert 'tq' not in t.TRANSPORT_ALIASES\n"
        "c.register_transports(); c.register_transports()\n"
        "assert t.TRANSPORT_ALIASES['tq'] == 'celery_tq.transport:Transport'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert transport_for_url("sqlite:///x.db") is SQLiteTransport
    with pytest.raises(ValueError, match=r"tq\+sqlite://"):
        transport_for_url("nosuch://host")
    monkeypatch.chdir(tmp_path)
    for url, path in [
        (f"tq+sqlite:///{tmp_path}/a/b.db", tmp_path / "a/b.db"),
        ("tq+sqlite:///rel/c.db", tmp_path / "rel/c.db"),
    ]:
        with Connection(url) as conn:
            assert isinstance(conn.transport, SQLiteTransport)
            conn.SimpleQueue("q").put(1)
        assert path.exists()
        with Connection(url) as conn, conn.SimpleQueue("q") as q:
            assert q.get(timeout=1).payload == 1


# -- single process semantics ----------------------------------------------------------


def test_priority_strict_and_fifo_within_level(url: str) -> None:
    rnd = random.Random(7)
    queue = Queue("prio", Exchange("prio"), "prio")
    sent = []
    with Connection(url, transport_options=FAST) as conn:
        producer = Producer(conn)
        for seq in range(200):
            prio = rnd.choice([None, *range(10)])
            producer.publish(
                {"seq": seq, "prio": prio},
                priority=prio,
                declare=[queue],
                exchange=queue.exchange,
                routing_key="prio",
            )
            sent.append((5 if prio is None else prio, seq))
        got = drain(conn, queue)
    assert [(5 if b["prio"] is None else b["prio"], b["seq"]) for b in got] == sorted(
        sent, key=lambda t: (-t[0], t[1])
    )


def test_size_purge_delete_reject_and_restore_on_close(url: str) -> None:
    with Connection(url, transport_options=FAST) as conn:
        ch = conn.default_channel
        q = Queue("ops", Exchange("ops"), "ops")(ch)
        q.declare()
        assert ch._has_queue("ops") and not ch._has_queue("nope")
        producer = Producer(ch, exchange=q.exchange, routing_key="ops")
        for i in range(3):
            producer.publish(i)
        assert q.queue_declare(passive=True).message_count == 3
        m = q.get()
        m.reject(requeue=True)
        again = q.get()
        assert again.payload == 0 and again.delivery_info.get("redelivered")
        assert q.purge() == 2  # the unacked one is not purged
        ch.close()  # closing the channel requeues the unacked message
    with Connection(url, transport_options=FAST) as conn:
        q = Queue("ops", Exchange("ops"), "ops")(conn.default_channel)
        assert [m.payload for m in iter(q.get, None)] == [0]
        q.delete()
        assert rows(url, "SELECT * FROM tq_binding WHERE queue='ops'") == []
        assert not conn.default_channel._has_queue("ops")


# -- several processes -----------------------------------------------------------------


def _fanout_consumer(url: str, name: str, ready: Any, out: Any, count: int) -> None:
    with Connection(url, transport_options=FAST) as conn:
        queue = Queue(name, Exchange("bcast", "fanout"), auto_delete=True)
        got: list[Any] = []
        with Consumer(conn, [queue], callbacks=[lambda b, m: (got.append(b), m.ack())]):
            ready.set()
            deadline = time.monotonic() + 15
            while len(got) < count and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.5)
        out.put((name, got))


def test_fanout_reaches_consumers_in_two_processes(url: str, procs: list[Any]) -> None:
    out = CTX.Queue()
    readies = [CTX.Event(), CTX.Event()]
    for i, ready in enumerate(readies):
        start(procs, _fanout_consumer, url, f"fan{i}", ready, out, 10)
    assert all(r.wait(10) for r in readies)
    with Connection(url) as conn:
        producer = Producer(conn, exchange=Exchange("bcast", "fanout"))
        for i in range(10):
            producer.publish(i)
    results = dict(out.get(timeout=20) for _ in readies)
    assert results == {"fan0": list(range(10)), "fan1": list(range(10))}


def _work_consumer(url: str, ready: Any, done: Any, out: Any) -> None:
    with Connection(url, transport_options=FAST) as conn:
        got: list[Any] = []
        queue = Queue("work", Exchange("work"), "work")

        def on_message(body: Any, message: Any) -> None:
            got.append(body)
            message.ack()
            with done.get_lock():
                done.value += 1
            time.sleep(0.002)  # a task's work: one consumer alone cannot drain 500 before the other polls

        with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=10):
            ready.set()  # consuming: the test publishes once both are
            deadline = time.monotonic() + 30
            while done.value < 500 and time.monotonic() < deadline:  # both consume until all are done
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.2)
        out.put(got)


def test_no_double_delivery_with_two_consuming_processes(url: str, procs: list[Any]) -> None:
    queue = Queue("work", Exchange("work"), "work")
    with Connection(url) as conn:
        queue(conn.default_channel).declare()
        out = CTX.Queue()
        readies = [CTX.Event(), CTX.Event()]
        done = CTX.Value("i", 0)
        for ready in readies:
            start(procs, _work_consumer, url, ready, done, out)
        assert all(r.wait(20) for r in readies)  # a late starter would find the queue drained
        producer = Producer(conn, exchange=queue.exchange, routing_key="work")
        for i in range(500):
            producer.publish(i)
        a, b = out.get(timeout=40), out.get(timeout=40)
    assert sorted(a + b) == list(range(500))
    assert a and b  # both really competed


def count(url: str) -> int:
    return int(rows(url, "SELECT count(*) FROM tq_message")[0][0])


def _sleeper(url: str, ready: Any) -> None:
    with Connection(url, transport_options=FAST) as conn:
        queue = Queue("celeryev.dead", Exchange("ev", "fanout"), auto_delete=True)
        with Consumer(conn, [queue], callbacks=[lambda b, m: m.ack()]):
            ready.set()
            time.sleep(60)


def test_growth_bounded_after_consumer_sigkill(url: str, procs: list[Any]) -> None:
    ready = CTX.Event()
    p = start(procs, _sleeper, url, ready)
    assert ready.wait(10)
    with Connection(url, transport_options=FAST) as conn:
        producer = Producer(conn, exchange=Exchange("ev", "fanout"))
        producer.publish("before")
        assert rows(url, "SELECT count(*) FROM tq_message")[0][0] == 1
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
        for i in range(150):  # 1.5 s of broadcasts, sweeps every 0.2 s
            producer.publish(i)
            time.sleep(0.01)
        assert rows(url, "SELECT count(*) FROM tq_message")[0][0] <= 30
        # the next sweep removes the dead queue's binding: a broadcast then stores nothing
        wait_for(
            lambda: (producer.publish("after"), count(url))[1] == 0,
            10,
            "the dead binding to go",
            interval=0.02,
        )
    assert rows(url, "SELECT * FROM tq_binding WHERE queue='celeryev.dead'") == []
    assert rows(url, "SELECT * FROM tq_queue WHERE name='celeryev.dead'") == []


def test_fanout_messages_expire_after_ttl(url: str) -> None:
    opts = {**FAST, "fanout_ttl": 0.1}
    with Connection(url, transport_options=opts) as conn:
        queue = Queue("slow", Exchange("ttl", "fanout"), auto_delete=True)
        queue(conn.default_channel).declare()
        producer = Producer(conn, exchange=queue.exchange)
        producer.publish(1)
        time.sleep(0.3)
        producer.publish(2)  # publishing sweeps, too
        assert rows(url, "SELECT count(*) FROM tq_message")[0][0] == 1


def _hold_unacked(url: str, ready: Any) -> None:
    with Connection(url, transport_options=FAST) as conn:
        queue = Queue("jobs", Exchange("jobs"), "jobs")

        def hold(body: Any, message: Any) -> None:
            ready.set()  # never acked

        with Consumer(conn, [queue], callbacks=[hold], prefetch_count=1):
            conn.drain_events(timeout=10)
            time.sleep(60)


def test_unacked_message_restored_after_consumer_sigkill(url: str, procs: list[Any]) -> None:
    queue = Queue("jobs", Exchange("jobs"), "jobs")
    with Connection(url, transport_options=FAST) as conn:
        queue(conn.default_channel).declare()
        producer = Producer(conn, exchange=queue.exchange, routing_key="jobs")
        for i, prio in enumerate([7, 3, 7]):
            producer.publish(i, priority=prio)
        ready = CTX.Event()
        p = start(procs, _hold_unacked, url, ready)
        assert ready.wait(10)
        assert rows(url, "SELECT count(*) FROM tq_message WHERE owner IS NOT NULL") == [(1,)]
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
        time.sleep(0.25)  # the transport sweeps (on this channel's next read) once per sweep_interval
        got = drain(conn, queue, redelivered=True)
    # The restored message keeps its place (priority, then id) and is flagged.
    assert got == [(0, True), (2, False), (1, False)]
    assert rows(url, "SELECT count(*) FROM tq_message") == [(0,)]
    assert rows(url, "SELECT count(*) FROM tq_owner") == [(0,)]


def test_get_raises_empty(url: str) -> None:
    with Connection(url) as conn, pytest.raises(Empty):
        conn.default_channel._get("nothing")
