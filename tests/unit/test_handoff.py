"""The hand-over of outcomes to the worker's main process, in one process: the ack waits for
the write, every outcome releases its ack, bad datagrams are dropped alone, and a pool
process keeps its own write where the hand-over does not apply. (Real workers:
tests/integration/test_outcome_handoff.py.)"""

from __future__ import annotations

import logging
import select
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from celery_tq.registry import Store, store_for_url
from celery_tq.registry.record import change
from celery_tq.worker import handoff as handoff_module
from celery_tq.worker.handoff import ACK_KEY, MAX_DATAGRAM, Handoff, hand_over


class Loop:
    """A stand-in for kombu's hub: readers and ``call_soon`` callbacks (from the writer thread)
    run in ``run()``."""

    def __init__(self) -> None:
        self.ready: list[Callable[[], None]] = []
        self.readers: dict[int, Callable[[], None]] = {}
        self.lock = threading.Lock()

    def call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        with self.lock:
            self.ready.append(lambda: callback(*args))

    def call_repeatedly(self, *_: Any) -> None:
        pass

    def add_reader(self, fd: Any, callback: Callable[[], None]) -> None:
        self.readers[fd if isinstance(fd, int) else fd.fileno()] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def run(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "timed out"
            with self.lock:
                ready, self.ready = self.ready, []
            for callback in ready:
                callback()
            readable, _, _ = select.select(list(self.readers), [], [], 0.005)
            for fd in readable:
                if fd in self.readers:
                    self.readers[fd]()


@pytest.fixture
def store() -> Store:
    return store_for_url(f"memory://{uuid.uuid4().hex}")


class Gate:
    """Holds the store's writes until opened, so a test sees the ack held first."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        write = store.write

        def gated(changes: Any) -> None:
            assert self.open.wait(5)
            write(changes)

        monkeypatch.setattr(store, "write", gated)


@pytest.fixture
def gate(store: Store, monkeypatch: pytest.MonkeyPatch) -> Gate:
    return Gate(store, monkeypatch)


@pytest.fixture
def active(store: Store) -> Iterator[tuple[Handoff, Loop]]:
    handoff, loop = Handoff(store, retry_for=2.0), Loop()
    handoff.start(loop)
    previous, handoff_module._active = handoff_module._active, handoff
    yield handoff, loop
    handoff_module._active = previous


def outcome(task_id: str, state: str = "SUCCESS") -> dict[str, Any]:
    return change(task_id, state, 0, name="t.work", result="1", meta="{}")


def send(handoff: Handoff, task_id: str, *rows: dict[str, Any]) -> None:
    assert handoff.send(handoff.datagram(task_id, list(rows) or [outcome(task_id)]))


def test_an_ack_is_held_until_the_outcome_is_written_then_released(
    active: tuple[Handoff, Loop], store: Store, gate: Gate
) -> None:
    handoff, loop = active
    acked: list[str] = []
    send(handoff, "a")
    assert handoff.hold("a", lambda: acked.append("a")) is True
    time.sleep(0.1)
    loop.run(lambda: True)
    assert acked == []  # not written yet: not acked
    gate.open.set()
    loop.run(lambda: acked == ["a"])
    row = store.read(["a"])[0]
    assert row is not None and row["state"] == "SUCCESS"  # written before the ack ran


def test_a_task_whose_outcome_was_not_handed_over_is_acked_at_once(active: tuple[Handoff, Loop]) -> None:
    handoff, _ = active
    assert handoff.hold("never-sent", lambda: None) is False


def test_two_outcomes_of_one_task_in_one_batch_release_both_acks(
    active: tuple[Handoff, Loop], gate: Gate
) -> None:
    handoff, loop = active
    acked: list[int] = []
    send(handoff, "first")  # the writer thread takes it and waits at the gate
    time.sleep(0.1)
    send(handoff, "twice")  # these two arrive meanwhile: one batch after it
    send(handoff, "twice", outcome("twice", "FAILURE"))
    assert handoff.hold("twice", lambda: acked.append(1))
    assert handoff.hold("twice", lambda: acked.append(2))
    gate.open.set()
    loop.run(lambda: sorted(acked) == [1, 2])


def test_an_unreadable_datagram_is_dropped_alone(
    active: tuple[Handoff, Loop], gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    handoff, loop = active
    acked: list[str] = []
    with caplog.at_level(logging.ERROR, logger="celery_tq.registry"):
        assert handoff.send(b"not a pickle")
        send(handoff, "b")
        assert handoff.hold("b", lambda: acked.append("b"))
        gate.open.set()
        loop.run(lambda: acked == ["b"])
    assert "unreadable outcome" in caplog.text


def test_shutdown_writes_what_arrived_and_releases_its_acks_in_place(
    active: tuple[Handoff, Loop], store: Store, gate: Gate
) -> None:
    handoff, _ = active
    acked: list[str] = []
    send(handoff, "c")
    assert handoff.hold("c", lambda: acked.append("c"))
    threading.Timer(0.2, gate.open.set).start()
    handoff.stop()
    assert acked == ["c"]  # no event loop needed
    send(handoff, "d")
    assert handoff.hold("d", lambda: acked.append("d")) is False  # written; the caller acks now
    assert store.read(["d"])[0] is not None


def test_what_arrives_after_the_pool_stopped_is_written_when_the_event_loop_closes(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Celery's warm shutdown can drop a task it gave a pool process just before (its start not
    seen yet); the pool process runs it and hands its outcome over, but nothing asks for that
    outcome. kombu's real hub runs ``on_close`` callbacks when the worker's Hub step stops (after
    the pool, before the broker channel closes): the outcome is written then."""
    from kombu.asynchronous import Hub

    hub = Hub()
    handoff = Handoff(store, retry_for=2.0)
    handoff.start(hub)
    handoff.stop()  # the worker step stops before the pool
    send(handoff, "dropped")  # the pool process's outcome; no result, so no hold(), reaches the loop
    assert store.read(["dropped"])[0] is None
    with caplog.at_level(logging.INFO, logger="celery_tq.registry"):
        hub.close()
    row = store.read(["dropped"])[0]
    assert row is not None and row["state"] == "SUCCESS"
    assert "outcome(s) of 1 task(s) the pool finished after the shutdown began (dropped)" in caplog.text


def _request(**fields: Any) -> SimpleNamespace:
    base = {ACK_KEY: True, "chord": None, "callbacks": None, "errbacks": None, "chain": None}
    return SimpleNamespace(**{**base, **fields})


@pytest.mark.parametrize(
    ("what", "request_fields", "state", "size"),
    [
        ("a callback follows it", {"callbacks": [{"task": "next"}]}, "SUCCESS", 10),
        ("a chain follows it", {"chain": [{"task": "next"}]}, "SUCCESS", 10),
        ("it is part of a chord", {"chord": {"task": "body"}}, "SUCCESS", 10),
        ("its worker acks early", {ACK_KEY: False}, "SUCCESS", 10),
        ("it is not an outcome", {}, "RETRY", 10),
        ("it is too large", {}, "SUCCESS", MAX_DATAGRAM + 1),
    ],
)
def test_a_pool_process_keeps_its_own_write_when(
    active: tuple[Handoff, Loop],
    store: Store,
    what: str,
    request_fields: dict[str, Any],
    state: str,
    size: int,
) -> None:
    handoff, _ = active
    handoff.owner = -1  # this test process plays a pool process
    row = change("e", state, 0, result="x" * size, meta="{}")
    assert hand_over(store, row, _request(**request_fields)) is False, what
    row = change("f", "SUCCESS", 0, result="1", meta="{}")
    assert hand_over(store, row, _request()) is True  # the same process hands a plain one over


def _run_for(loop: Loop, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    loop.run(lambda: time.monotonic() >= deadline, timeout=seconds + 5)


def _settling(task: Any = None) -> threading.Thread:
    thread = threading.Thread(target=handoff_module.settle_before_run, kwargs={"task": task}, daemon=True)
    thread.start()
    return thread


def test_a_pool_process_runs_its_next_task_only_once_enough_of_its_outcomes_are_written(
    active: tuple[Handoff, Loop], store: Store, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff, loop = active
    handoff.owner = -1  # this test process plays a pool process
    monkeypatch.setattr(handoff_module, "_child", None)
    unrecorded = handoff_module.UNRECORDED
    for i in range(unrecorded - 1):  # fewer than the bound: the next task runs at once
        assert hand_over(store, change(f"s{i}", "SUCCESS", 0, result="1", meta="{}"), _request())
        settle = _settling()
        settle.join(1)
        assert not settle.is_alive()
    assert hand_over(store, change("last", "SUCCESS", 0, result="1", meta="{}"), _request())
    settle = _settling()
    _run_for(loop, 0.3)
    assert settle.is_alive()  # the store has none of them yet: the next task waits
    gate.open.set()
    loop.run(lambda: not settle.is_alive())  # the main process's loop reads and writes them
    assert store.read(["s0"])[0] is not None


def test_waiting_for_written_outcomes_takes_at_most_half_the_next_tasks_time_limit(
    active: tuple[Handoff, Loop],
    store: Store,
    gate: Gate,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handoff, _ = active
    handoff.owner = -1
    monkeypatch.setattr(handoff_module, "_child", None)
    for i in range(handoff_module.UNRECORDED):
        assert hand_over(store, change(f"t{i}", "SUCCESS", 0, result="1", meta="{}"), _request())
    task = SimpleNamespace(request=SimpleNamespace(id="next", timelimit=(None, 0.6)), app=None)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="celery_tq.registry"):
        handoff_module.settle_before_run(task=task)
    assert 0.25 < time.monotonic() - started < 2  # the store is still down (gate closed)
    assert "running task next anyway" in caplog.text
    gate.open.set()


def test_a_pool_process_that_cannot_open_its_reply_socket_writes_its_outcomes_itself(
    active: tuple[Handoff, Loop], store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff, _ = active
    handoff.owner = -1
    monkeypatch.setattr(handoff_module, "_child", None)
    monkeypatch.setattr(handoff_module, "_unable", 0)

    def no_abstract_namespace(owner: int) -> None:
        raise OSError("address family not supported")

    monkeypatch.setattr(handoff_module, "_ChildEnd", no_abstract_namespace)
    row = change("own", "SUCCESS", 0, result="1", meta="{}")
    assert hand_over(store, row, _request()) is False
    assert hand_over(store, row, _request()) is False  # and it does not try again
    handoff_module.settle_before_run(task=None)  # nothing handed over: nothing to wait for
