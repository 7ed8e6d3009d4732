"""A failed task-event probe leaves task events on and publishes the event as Celery would."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from celery_tq.worker import watched_events as watched_events


class _BrokenConnection:
    calls = 0

    def channel(self) -> Any:
        self.calls += 1
        raise ConnectionError("broker gone")


class _Dispatcher:
    def __init__(self) -> None:
        self.groups: set[str] = set()
        self.published: list[str] = []
        self.producer = type("P", (), {"connection": _BrokenConnection()})()

    def _publish(self, event: Any, producer: Any, routing_key: str, *args: Any, **kwargs: Any) -> None:
        self.published.append(routing_key)


def test_a_failed_probe_keeps_task_events_on_and_backs_off() -> None:
    dispatcher = _Dispatcher()
    probe = watched_events._Probe(dispatcher)
    probe._set_watched(False)
    assert dispatcher.groups == {"worker"}  # paused: only worker events pass

    probe.publish({"type": "worker-heartbeat"}, None, "worker.heartbeat")
    assert dispatcher.published == ["worker.heartbeat"]  # sent the plain way
    assert probe.watched and dispatcher.groups == {"worker", "task"}  # resumed: fail open
    probe.publish({"type": "worker-heartbeat"}, None, "worker.heartbeat")  # backing off: no probe
    assert dispatcher.published == ["worker.heartbeat"] * 2
    assert dispatcher.producer.connection.calls == 1


def test_a_failed_probe_is_not_logged_as_a_listening_monitor(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = _Dispatcher()
    probe = watched_events._Probe(dispatcher)
    probe._set_watched(False)
    with caplog.at_level(logging.INFO, logger="celery_tq"):
        probe.publish({"type": "worker-heartbeat"}, None, "worker.heartbeat")
    assert dispatcher.groups == {"worker", "task"}
    assert "a monitor is listening" not in caplog.text
    assert "the event probe failed (ConnectionError('broker gone'))" in caplog.text


def test_task_events_are_never_probes() -> None:
    dispatcher = _Dispatcher()
    probe = watched_events._Probe(dispatcher)
    probe.publish([{"type": "task-received"}], None, "task.multi")
    assert dispatcher.published == ["task.multi"] and probe.producer is None
