"""Links and servers that fail: a frozen or dropped broker link, a store that is down, a Redis
broker that restarts empty."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.private_redis import PrivateRedis
from tests.tcp_proxy import TcpProxy

from .harness import Outcome, Setup, counts, fmt, running, starts, tally, wait_until, with_port


def frozen_link(setup: Setup) -> Outcome:
    """The worker's broker links freeze (half-open, no FIN) with 2 tasks running; 5 more follow."""
    with TcpProxy(setup.broker_port) as proxy, setup.run("frozen", start=False) as (app, data, start_worker):
        start_worker(broker_url=with_port(setup.broker, setup.broker_port, proxy.port))
        work = app.tasks["fault.work"]
        work.delay("warm", 0).get(timeout=30)
        in_flight = [f"f{i}" for i in range(2)]
        for label in in_flight:
            work.delay(label, 2.0)
        wait_until(lambda: len(running(data)) >= 2, 20)
        proxy.freeze()  # task events are on (the preset): the event connection freezes too
        frozen_at = time.time()
        later = [f"l{i}" for i in range(5)]
        for label in later:
            work.delay(label, 0.2)
        labels = in_flight + later
        wait_until(lambda: all(counts(data, "done").get(lab) for lab in labels), 180, 0.2)
        resumed = min((t for lab in later for t in starts(data, lab)), default=float("inf")) - frozen_at
        lost, twice = tally(data, labels)
        return Outcome(
            "broker link half-open (frozen, no FIN), task events on",
            f"resumed {fmt(resumed)} s after the freeze; lost {lost} of {len(labels)}; "
            f"completed twice {twice}",
            "resumed by itself" if resumed < 180 else "hung",
            resumed < 60 and lost == 0,
        )


def dropped_link(setup: Setup, tasks: int = 50, drops: int = 2) -> Outcome:
    """The worker's broker connections are closed and refused for 5 s, twice, each time right
    after a task finished (its ack may not have reached the broker)."""
    with (
        TcpProxy(setup.broker_port, refuse_for=5.0) as proxy,
        setup.run("dropped", start=False) as (
            app,
            data,
            start_worker,
        ),
    ):
        worker = start_worker(broker_url=with_port(setup.broker, setup.broker_port, proxy.port))
        work = app.tasks["fault.work"]
        labels = [f"t{i}" for i in range(tasks)]
        results = [work.delay(label, 1.0) for label in labels]
        for n in range(1, drops + 1):
            before = sum(counts(data, "done").values())
            target = max(before + 1, tasks * n // (drops + 2))
            wait_until(lambda t=target: sum(counts(data, "done").values()) >= t, 120, 0.002)
            proxy.drop()
        started = time.monotonic()
        wait_until(lambda: all(r.ready() for r in results), tasks + 60, 0.2)
        elapsed = time.monotonic() - started
        lost, twice = tally(data, labels)
        cut = sum(counts(data, "start").values()) - sum(counts(data, "done").values())
        unrun = worker.log.count("acked without running")
        states = "/".join(sorted({r.state for r in results}))
        return Outcome(
            f"broker connection dropped for 5 s, x{drops}, tasks in flight",
            f"lost {lost}; completed twice {twice}; runs cut by a drop and run again {cut}; "
            f"redelivered after they ended and acked unrun {unrun}; "
            f"all done {elapsed:.1f} s after the last drop",
            f"{tasks} x {states}",
            lost == 0 and twice == 0 and states == "SUCCESS",
        )


def store_down(setup: Setup) -> Outcome:
    """``get(timeout=3)`` on a queued task while the result store is unreachable."""
    from celery_tq import system_for

    with tempfile.TemporaryDirectory() as tmp:
        if setup.store_port == 6379:  # a private redis-server as the store, killed
            server = PrivateRedis(Path(tmp))
            server.start()
            backend, stop = f"tq+redis://127.0.0.1:{server.port}/0", server.kill
        else:  # PostgreSQL behind a proxy, killed: refused, like a server that is down
            proxy = TcpProxy(setup.store_port).start()
            backend, stop = with_port(setup.backend, setup.store_port, proxy.port), proxy.stop
        try:
            with setup.run("storedown", start=False, backend=backend) as (app, _data, _start):
                queued = app.tasks["fault.work"].delay("queued", 0)  # no worker: it stays queued
                system_for(app).registry.get(queued.id)  # its QUEUED is written
                stop()
                started, detail = time.monotonic(), ""
                try:
                    queued.get(timeout=3)
                    raised = "returned?"
                except Exception as exc:
                    raised = f"{type(exc).__module__}.{type(exc).__name__}"
                    detail = "the store is unreachable" if "unreachable" in str(exc) else str(exc)[:60]
                elapsed = time.monotonic() - started
        finally:
            stop()
        return Outcome(
            "get(timeout=3) while the store is down",
            f"returned after {elapsed:.1f} s",
            f"{raised}: {detail}" if detail else raised,
            elapsed < 5 and raised == "celery.exceptions.TimeoutError",
        )


def lost_in_broker(setup: Setup, tasks: int = 30) -> Outcome:
    """A Redis broker without persistence is killed and restarts empty with tasks queued."""
    from celery_tq import system_for

    with tempfile.TemporaryDirectory() as tmp:
        server = PrivateRedis(Path(tmp))  # no AOF, no RDB
        server.start()
        broker = f"tq+redis://127.0.0.1:{server.port}/0"
        try:
            with setup.run("lost", start=False, broker=broker) as (app, data, start_worker):
                registry = system_for(app).registry
                work = app.tasks["fault.work"]
                dropped = {work.delay(f"q{i}", 0.05).id: f"q{i}" for i in range(tasks)}
                registry.get(next(iter(dropped)))  # the QUEUED writes are in
                server.kill()
                server.start()  # empty
                kept = work.delay("kept", 0.05).id  # queued after the restart: not lost
                env = {**os.environ, **setup.env(data, broker)}

                def tq(*args: str) -> subprocess.CompletedProcess[str]:
                    command = [sys.executable, "-m", "celery", "-A", "faultbench_app", "tq", *args]
                    return subprocess.run(
                        command, env=env, cwd=setup.root, capture_output=True, text=True, timeout=120
                    )

                listed = {e["id"] for e in json.loads(tq("lost", "--older-than", "0s", "--json").stdout)}
                resent = tq("lost", "--older-than", "0s", "--resend")
                started = time.monotonic()
                worker = start_worker(broker_url=broker)
                ids = [*dropped, kept]

                def all_done() -> bool:
                    return all((r := registry.get(i)) is not None and r.state == "SUCCESS" for i in ids)

                wait_until(all_done, 120, 0.2)
                elapsed = time.monotonic() - started
                lost, twice = tally(data, [*dropped.values(), "kept"])
                warned = "keeps nothing on disk" in worker.log
        finally:
            server.kill()
        right = listed == set(dropped)
        return Outcome(
            "Redis broker without persistence crashes (kill -9, restart)",
            f"`tq lost` listed {len(listed)} of {tasks} dropped "
            f"({'exactly those' if right else 'NOT those'}); after `--resend` (exit {resent.returncode}) "
            f"and a worker: lost {lost}, completed twice {twice}, {elapsed:.1f} s; "
            f"worker log warns of no AOF/RDB: {'yes' if warned else 'no'}",
            "every task SUCCESS once" if lost == 0 and twice == 0 else "tasks lost",
            right and resent.returncode == 0 and lost == 0 and twice == 0 and warned,
        )
