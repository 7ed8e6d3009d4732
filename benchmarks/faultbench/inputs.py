"""Hostile input: a body no worker can read, an argument too big, ids no store can hold."""

from __future__ import annotations

import time
import uuid

from .harness import Outcome, Setup, counts, wait_until


def malformed(setup: Setup) -> Outcome:
    """A body that is not JSON, with a task id header."""
    from celery.result import AsyncResult
    from kombu import Connection

    with setup.run("malformed") as (app, _data, _start):
        task_id = str(uuid.uuid4())
        started = time.monotonic()
        with Connection(app.conf.broker_url) as conn:
            conn.Producer().publish(
                b'{"not": json',
                routing_key="tq.default",
                content_type="application/json",
                content_encoding="utf-8",
                headers={"task": "fault.work", "id": task_id},
            )
        ok = wait_until(lambda: AsyncResult(task_id, app=app).state == "REJECTED", 60)
        elapsed = time.monotonic() - started
        return Outcome(
            "malformed JSON body with a task id header",
            f"terminal after {elapsed:.1f} s",
            f"{AsyncResult(task_id, app=app).state} (AsyncResult and registry)",
            ok,
        )


def oversized(setup: Setup) -> Outcome:
    """A 150 MB argument."""
    from celery_tq.errors import InvalidInput

    with setup.run("oversized") as (app, data, _start):
        big = "x" * (150 * 1024 * 1024)
        started = time.monotonic()
        try:
            app.tasks["fault.work"].delay(big, 0)
            terminal = "sent"
        except InvalidInput:
            terminal = "InvalidInput at publish, nothing sent"
        elapsed = time.monotonic() - started
        del big
        runs = sum(counts(data, "start").values())
        return Outcome(
            "150 MB argument",
            f"refused in {elapsed:.2f} s; runs {runs}",
            terminal,
            terminal.startswith("InvalidInput") and elapsed < 1 and runs == 0,
        )


def unstorable_ids(setup: Setup) -> Outcome:
    """An id, name, queue or tag longer than a store can hold; then ordinary tasks of the client."""
    from celery_tq import system_for

    with setup.run("ids") as (app, data, _start):
        work = app.tasks["fault.work"]
        attempts = {
            "id 200 chars": lambda: work.apply_async(("bad", 0), task_id="i" * 200),
            "name 300": lambda: app.send_task("n" * 300, ("bad", 0)),
            "queue 300": lambda: work.apply_async(("bad", 0), queue="q" * 300),
            "tag 100": lambda: work.apply_async(("bad", 0), tags={"t" * 100}),
        }
        refused: dict[str, str] = {}
        slowest = 0.0
        for what, send in attempts.items():
            started = time.monotonic()
            try:
                send()
                refused[what] = "sent"
            except Exception as exc:
                refused[what] = type(exc).__name__
            slowest = max(slowest, time.monotonic() - started)
        registry = system_for(app).registry
        later = [work.delay(f"ok{i}", 0.1) for i in range(5)]

        def recorded() -> bool:
            return all((r := registry.get(x.id)) is not None and r.state == "SUCCESS" for x in later)

        ok = wait_until(recorded, 60, 0.1)
        runs = counts(data, "start").get("bad", 0)
        by_error = ", ".join(f"{what}: {error}" for what, error in refused.items())
        return Outcome(
            "task id of 200 characters; name, queue, tag too long for the store",
            f"each refused in <= {slowest * 1000:.0f} ms; runs {runs}; 5 later tasks recorded: "
            f"{'yes' if ok else 'NO'}",
            by_error,
            ok and runs == 0 and all(e in ("InvalidInput", "MetadataError") for e in refused.values()),
        )
