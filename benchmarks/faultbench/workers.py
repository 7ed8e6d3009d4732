"""Processes that die: a busy pool process, a poison task, a whole worker; a redelivered message."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from .harness import Outcome, Setup, counts, fmt, log_lines, running, starts, tally, wait_until


def kill_busy_children(setup: Setup, tasks: int = 50, kills: int = 3) -> Outcome:
    """``kills`` pool processes killed mid-task (an OOM kill), a few seconds apart."""
    with setup.run("kill") as (app, data, _start):
        work = app.tasks["fault.work"]
        results = [work.delay(f"t{i}", 1.0) for i in range(tasks)]
        killed: list[tuple[str, float]] = []
        while len(killed) < kills:
            wait_until(lambda: len(running(data)) >= 2, 20)
            now_running = running(data)
            label = max(now_running, key=lambda lab: now_running[lab][1])  # the latest to start
            try:
                os.kill(now_running[label][0], signal.SIGKILL)
            except ProcessLookupError:  # it finished (or died) in between: pick again
                continue
            killed.append((label, time.time()))
            time.sleep(3)
        started = time.monotonic()
        wait_until(lambda: all(r.ready() for r in results), tasks / 2 + 35, 0.2)
        elapsed = time.monotonic() - started
        redelivery = max(
            (max((t for t in starts(data, lab) if t > at), default=float("inf")) - at for lab, at in killed),
            default=0.0,
        )
        runs = sum(len(starts(data, lab)) for lab, _ in killed)
        lost, twice = tally(data, [f"t{i}" for i in range(tasks)])
        states = "/".join(sorted({r.state for r in results}))
        return Outcome(
            f"kill -9 of a busy pool process, x{kills}",
            f"re-run {fmt(redelivery)} s after the kill (worst); runs of the hurt tasks {runs}; "
            f"lost {lost}; completed twice {twice}; all done {elapsed:.1f} s after the last kill",
            f"{tasks} x {states}",
            redelivery < 5 and lost == 0 and twice == 0 and states == "SUCCESS",
        )


def poison(setup: Setup) -> Outcome:
    """A task that kills its own process every time."""
    with setup.run("poison") as (app, data, _start):
        started = time.monotonic()
        result = app.tasks["fault.work"].delay("poison", 0, die=True)
        try:
            result.get(timeout=120)
            terminal = "SUCCESS?"
        except Exception as exc:
            terminal = f"{result.state} {type(exc).__name__}"
        elapsed = time.monotonic() - started
        runs = len(starts(data, "poison"))
        return Outcome(
            "poison task (kills its own process)",
            f"{runs} runs; terminal after {elapsed:.1f} s",
            terminal,
            terminal == "FAILURE WorkerLost" and elapsed < 60,
        )


def redelivered_ended(setup: Setup) -> Outcome:
    """A finished task's message comes back unacked (its worker died before the ack)."""
    from celery.app.task import Context
    from kombu import Connection

    with setup.run("redelivered", start=False) as (app, data, start_worker):
        work = app.tasks["fault.work"]
        work.apply_async(("ended", 0), task_id="ended-1")
        got: list[Any] = []
        with Connection(app.conf.broker_url) as conn:  # a worker that dies before its ack
            with conn.Consumer(app.amqp.queues["tq.default"], callbacks=[lambda body, m: got.append(m)]):
                while not got:
                    conn.drain_events(timeout=10)
            app.backend.mark_as_done("ended-1", "ended", request=Context(id="ended-1", task=work.name))
        started = time.monotonic()
        worker = start_worker()
        acked = wait_until(lambda: "acked without running" in worker.log, 30)
        elapsed = time.monotonic() - started
        runs = len(log_lines(data))
        state = work.AsyncResult("ended-1").state
        return Outcome(
            "redelivered after it ended",
            f"runs {runs}; acked {elapsed:.1f} s after the worker started",
            f"{state}, acked without running" if acked else f"{state}, not acked",
            acked and runs == 0 and state == "SUCCESS",
        )


def second_run(setup: Setup) -> Outcome:
    """kill -9 of the whole worker mid-task; another worker runs the task again."""
    from celery_tq import system_for

    with setup.run("deliveries", start=False) as (app, data, start_worker):
        registry = system_for(app).registry
        first = start_worker(hostname="first@faultbench")
        result = app.tasks["fault.work"].delay("twice", 3.0)

        def started_on_first() -> bool:
            record = registry.get(result.id)
            return record is not None and record.state == "STARTED"

        wait_until(started_on_first, 30)
        first.kill()
        killed_at = time.time()
        start_worker(hostname="second@faultbench")
        result.get(timeout=180)
        record = registry.get(result.id)
        runs = starts(data, "twice")
        again = max(runs) - killed_at if len(runs) > 1 else float("inf")
        assert record is not None and record.started_at is not None
        last_run = len(runs) > 1 and abs(record.started_at.timestamp() - max(runs)) < 1
        done = counts(data, "done").get("twice", 0)
        return Outcome(
            "second run after a redelivery (kill -9 of the worker)",
            f"re-run {fmt(again)} s after the kill; runs {len(runs)}; deliveries {record.deliveries}; "
            f"retries {record.retries}; started_at {'the second' if last_run else 'NOT the second'} run's",
            f"{record.state} on {record.worker}",
            record.state == "SUCCESS" and record.deliveries == 2 and last_run and done == 1,
        )
