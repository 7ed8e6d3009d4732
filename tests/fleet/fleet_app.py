"""The app the fleet's workers run: one task that records each run in an independent ledger.

The ledger (``TQ_FLEET_LEDGER``, one file shared by every namespace) gets one line per event,
written with a single ``O_APPEND`` write: ``R <id> <host> <t>`` when a worker receives the
message, ``S <id> <host> <t> <redelivered 0|1>`` when the body starts, ``E <id> <host> <start> <end>`` when it
ends. Broker and store come from the production preset's variables (``TQ_BROKER_URL``,
``TQ_RESULT_BACKEND``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.signals import task_received

import celery_tq

HOST = os.environ.get("TQ_FLEET_HOST", "client")


def record(*fields: object) -> None:
    line = " ".join(str(f) for f in fields) + "\n"
    fd = os.open(os.environ["TQ_FLEET_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def make_app() -> Celery:
    app = Celery("fleet", set_as_current=False)
    tq = celery_tq.install(app, preset="production")
    # the preset hands outcomes to the worker's main process; TQ_FLEET_HANDOVER=0 turns that off
    # (tests/fleet/test_fleet.py)
    if os.environ.get("TQ_FLEET_HANDOVER") == "0":
        app.conf.tq_hand_over_outcomes = False

    @tq.task(name="fleet.work", shared=False, bind=True)
    def work(self: Any, ms: float) -> None:
        start = time.time()
        redelivered = int(bool((self.request.delivery_info or {}).get("redelivered")))
        record("S", self.request.id, HOST, f"{start:.6f}", redelivered)
        time.sleep(ms / 1000)
        record("E", self.request.id, HOST, f"{start:.6f}", f"{time.time():.6f}")

    return app


def _on_received(request: Any = None, **_: Any) -> None:
    if request is not None and "TQ_FLEET_LEDGER" in os.environ:
        record("R", request.id, HOST, f"{time.time():.6f}")


task_received.connect(_on_received, weak=False, dispatch_uid="tq-fleet-ledger")
app = make_app()
