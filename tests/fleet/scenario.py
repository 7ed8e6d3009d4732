"""One fleet run: real workers in host namespaces, a fault on host 0, the ledger's verdict.

Used by ``tests/fleet`` (few tasks) and ``benchmarks/fleet.py`` (the full matrix). Faults:
``host_loss`` (kill -9 of every process of host 0), ``partition`` (host 0's link down for
``partition_s``, then up), ``power_cut`` (link down, ``power_cut_s`` later kill -9), ``none``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery_tq.testing import WorkerProcess
from tests.fleet.netns import ROOT, Fleet

FAULTS = ("host_loss", "partition", "power_cut", "none")
BROKERS = ("redis", "rabbitmq")
PG_DSN = "postgresql://postgres@{host}:5432/test"
# A run that starts this soon after the fault was on its way as it hit (handed to the pool before
# the worker could know of it); one that starts later was reserved and should have been dropped.
IN_FLIGHT_S = 0.5
REDIS_DB = int(os.environ.get("TQ_TEST_REDIS_DB_BASE", "12"))  # tests/conftest.py sets it per process


@dataclass
class Outcome:
    """What the ledger and the registry say about one run."""

    fault: str
    broker: str
    tasks: int
    lost: int = 0
    duplicates: int = 0
    duplicates_not_started: int = 0  # run twice though no run started before fault + IN_FLIGHT_S
    held: int = 0  # received by host 0 and not finished there when the fault hit
    redelivery_s: float | None = None  # fault -> the last held task started elsewhere
    stall_s: float = 0.0  # longest gap between two task events on a healthy host with work left
    records: dict[str, int] = field(default_factory=dict)
    resumed_s: float | None = None  # partition: link up -> host 0 ran a task sent to it alone
    t_fault: float = 0.0
    t_healed: float = 0.0
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.records.get("SUCCESS", 0) == self.tasks and sum(self.records.values()) == self.tasks

    def row(self) -> str:
        redelivery = "-" if self.redelivery_s is None else f"{self.redelivery_s:.1f}"
        resumed = "-" if self.resumed_s is None else f"{self.resumed_s:.1f}"
        return (
            f"| {self.fault} | {self.broker} | {self.tasks} | {self.lost} | {self.duplicates} "
            f"({self.duplicates_not_started} not started) | {self.held} | {redelivery} | {self.stall_s:.2f} "
            f"| {resumed} "
            f"| {self.records.get('SUCCESS', 0)}/{self.tasks}"
            f"{'' if self.terminal else ' ' + str(self.records)} |"
        )


HEADER = (
    "| fault | broker | tasks | lost | duplicates | held by host 0 | redelivery s | healthy hosts' "
    "longest stall s | host 0 back s | records SUCCESS |\n|---|---|---|---|---|---|---|---|---|---|"
)


@contextlib.contextmanager
def _broker(kind: str, host: str) -> Iterator[str]:
    """A broker URL on ``host`` with nothing left from other runs; cleaned up afterwards."""
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}")
        client.flushdb()
        try:
            yield f"redis://{host}:6379/{REDIS_DB}"
        finally:
            client.flushdb()
            client.close()
        return
    vhost = f"tq-fleet-{uuid.uuid4().hex[:8]}"

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True)

    ctl("add_vhost", vhost)
    try:
        ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{host}:5672/{vhost}"
    finally:
        ctl("delete_vhost", vhost)


@contextlib.contextmanager
def _schema() -> Iterator[str]:
    import psycopg

    schema = f"tq_fleet_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN.format(host="127.0.0.1"), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        with psycopg.connect(PG_DSN.format(host="127.0.0.1"), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _backend(host: str, schema: str) -> str:
    return f"tq+{PG_DSN.format(host=host)}?options=-csearch_path%3D{schema}"


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split() for line in self.path.read_text().splitlines() if line.strip()]

    def ended(self) -> set[str]:
        return {f[1] for f in self.lines() if f[0] == "E"}


@dataclass
class RunningFleet:
    """Workers up in every host namespace, and a client app on the root namespace's loopback."""

    fleet: Fleet
    workers: list[WorkerProcess]
    app: Any
    ledger: Ledger

    @property
    def registry(self) -> Any:
        from celery_tq import system_for

        return system_for(self.app).registry

    def logs(self) -> dict[str, str]:
        return {f"h{i}": w.log for i, w in enumerate(self.workers)}


@contextlib.contextmanager
def running_fleet(broker: str, hosts: int = 3) -> Iterator[RunningFleet]:
    """``hosts`` namespaces with a ``celery worker -c 1`` each, a fresh broker vhost/db and schema."""
    with (
        tempfile.TemporaryDirectory(prefix="tq-fleet-") as tmp,
        Fleet(hosts) as fleet,
        _broker(broker, fleet.server_ip) as worker_broker,
        _schema() as schema,
    ):
        ledger = Ledger(Path(tmp) / "ledger")
        workers = [
            WorkerProcess(
                "tests.fleet.fleet_app",
                concurrency=1,
                queues=["tq.default", f"fleet.h{i}"],  # fleet.h<i>: a task for that host only
                hostname=f"h{i}@fleet-{fleet.suffix}",
                cwd=ROOT,
                prefix=fleet.exec_prefix(i),
                env={
                    "TQ_BROKER_URL": worker_broker,
                    "TQ_RESULT_BACKEND": _backend(fleet.server_ip, schema),
                    "TQ_FLEET_LEDGER": str(ledger.path),
                    "TQ_FLEET_HOST": f"h{i}",
                },
                ready_timeout=120,
            )
            for i in range(hosts)
        ]
        app = None
        try:
            starters = [threading.Thread(target=w.start) for w in workers]
            for t in starters:
                t.start()
            for t in starters:
                t.join()
            for w in workers:
                if w.process is None or w.process.poll() is not None:
                    raise RuntimeError(f"a fleet worker did not start:\n{w.log[-3000:]}")
            with _environ(
                TQ_BROKER_URL=worker_broker.replace(fleet.server_ip, "127.0.0.1"),
                TQ_RESULT_BACKEND=_backend("127.0.0.1", schema),
                TQ_FLEET_LEDGER=str(ledger.path),
            ):
                from tests.fleet.fleet_app import make_app

                app = make_app()
            yield RunningFleet(fleet, workers, app, ledger)
        finally:
            if app is not None:
                with contextlib.suppress(Exception):
                    app.close()
            for w in workers:
                with contextlib.suppress(Exception):
                    w.stop(timeout=15)


def run(
    fault: str,
    broker: str,
    *,
    hosts: int = 3,
    tasks: int = 3000,
    ms: float = 10.0,
    fault_after: float = 0.25,
    partition_s: float = 35.0,
    power_cut_s: float = 5.0,
    finish_timeout: float = 240.0,
    resume_timeout: float = 120.0,
    keep: Path | None = None,
) -> Outcome:
    """Run ``tasks`` tasks of ``ms`` on ``hosts`` hosts (c=1), inject ``fault`` on host 0.

    ``keep``: a directory that receives the ledger, the fault's times and the workers' logs."""
    with running_fleet(broker, hosts) as running:
        ledger, registry = running.ledger, running.registry
        work = running.app.tasks["fleet.work"]
        ids = [work.apply_async((ms,)).id for _ in range(tasks)]
        _wait(lambda: len(ledger.ended()) >= fault_after * tasks, 120, "work to start")
        t_fault = _inject(running.fleet, fault, partition_s, power_cut_s)
        t_healed = time.time()

        def finished() -> bool:
            return ledger.ended() >= set(ids) and registry.counts().get("SUCCESS", 0) == tasks

        with contextlib.suppress(TimeoutError):
            _wait(finished, finish_timeout, "every task to finish")
        resumed_s = None
        if fault == "partition":
            # Back on the link, host 0 may still run what it held (a worker that never noticed
            # the cut resumes when a TCP retransmission gets through): wait until it has run a
            # task sent to it alone, then a little longer.
            probe = work.apply_async((1,), queue="fleet.h0", tags={"probe"}).id
            with contextlib.suppress(TimeoutError):
                _wait(lambda: probe in ledger.ended(), resume_timeout, "host 0 to resume")
                ends = [float(f[4]) for f in ledger.lines() if f[0] == "E" and f[1] == probe]
                resumed_s = max(ends) - t_healed
                time.sleep(2)
        outcome = analyse(ledger.lines(), ids, fault, broker, t_fault, t_healed, hosts)
        probes = registry.counts(tags={"probe"})
        counts = {k: n - probes.get(k, 0) for k, n in registry.counts().items()}
        outcome.records = {k: n for k, n in counts.items() if n}
        outcome.resumed_s = resumed_s
        outcome.t_fault, outcome.t_healed = t_fault, t_healed
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            name = f"{fault}-{broker}-{running.fleet.suffix}"
            (keep / f"{name}.ledger").write_text(ledger.path.read_text())
            (keep / f"{name}.times").write_text(f"{t_fault} {t_healed}\n")
            for i, w in enumerate(running.workers):
                (keep / f"{name}.h{i}.log").write_text(w.log)
        outcome.logs = running.logs()
    return outcome


def priority_run(
    broker: str, *, hosts: int = 3, backlog: int = 600, ms: float = 10.0, urgent: int = 5
) -> list[int]:
    """Per urgent (CRITICAL) task sent behind a LOW backlog: how many LOW tasks started after it was
    sent and before it started. The bound is hosts x (concurrency + 1)."""
    from celery_tq import Priority

    overtaken = []
    with running_fleet(broker, hosts) as running:
        ledger = running.ledger
        work = running.app.tasks["fleet.work"]
        low = {work.apply_async((ms,), priority=Priority.LOW).id for _ in range(backlog)}
        step = backlog // (urgent + 2)
        for n in range(1, urgent + 1):
            _wait(lambda n=n: len(ledger.ended() & low) >= n * step, 120, "the backlog to run")
            sent = time.time()
            uid = work.apply_async((ms,), priority=Priority.CRITICAL).id
            _wait(lambda uid=uid: uid in ledger.ended(), 60, "the urgent task")
            begun = min(float(f[3]) for f in ledger.lines() if f[0] == "S" and f[1] == uid)
            overtaken.append(
                sum(1 for f in ledger.lines() if f[0] == "S" and f[1] in low and sent < float(f[3]) < begun)
            )
    return overtaken


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _inject(fleet: Fleet, fault: str, partition_s: float, power_cut_s: float) -> float:
    """Hit host 0; returns when the fault hit: once every process is killed, or the link is down
    (killing and ``ip`` take milliseconds, in which host 0 may still start and finish a task)."""
    if fault == "host_loss":
        fleet.kill_host(0)
        return time.time()
    if fault not in ("partition", "power_cut"):
        return time.time()
    fleet.partition(0)
    t_fault = time.time()
    if fault == "partition":
        time.sleep(partition_s)
        fleet.heal(0)
    else:
        time.sleep(power_cut_s)
        fleet.kill_host(0)
    return t_fault


def _wait(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}")
        time.sleep(0.2)


def analyse(
    lines: list[list[str]],
    ids: list[str],
    fault: str,
    broker: str,
    t_fault: float,
    t_healed: float,
    hosts: int,
) -> Outcome:
    """The verdict on one run from the ledger's lines (see :mod:`tests.fleet.fleet_app`)."""
    received: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
    starts: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
    ends: dict[str, list[tuple[str, float, float]]] = collections.defaultdict(list)
    events: dict[str, list[float]] = collections.defaultdict(list)
    redelivered: set[str] = set()
    for f in lines:
        if f[0] == "R":
            received[f[1]].append((f[2], float(f[3])))
        elif f[0] == "S":
            starts[f[1]].append((f[2], float(f[3])))
            if f[4:5] == ["1"]:
                redelivered.add(f[1])
            events[f[2]].append(float(f[3]))
        elif f[0] == "E":
            ends[f[1]].append((f[2], float(f[3]), float(f[4])))
            events[f[2]].append(float(f[4]))
    out = Outcome(fault, broker, len(ids))
    out.lost = sum(1 for i in ids if not ends.get(i))
    for i in ids:
        runs = len(ends.get(i, ()))
        if runs > 1:
            out.duplicates += runs - 1
            if min(t for _, t in starts[i]) >= t_fault + IN_FLIGHT_S:
                out.duplicates_not_started += runs - 1
    if fault == "none":
        return out
    held = [
        i
        for i in ids
        if any(h == "h0" and t < t_fault for h, t in received.get(i, ()))
        and not any(h == "h0" and end < t_fault for h, _, end in ends.get(i, ()))
    ]
    out.held = len(held)
    delays = []
    for i in held:
        # Elsewhere (RabbitMQ redelivers a killed host's task before the kill call even returns),
        # or on host 0 itself after the fault.
        got = max(t for h, t in received[i] if h == "h0")
        later = [t for h, t in starts.get(i, ()) if t > got and h != "h0"]
        later = later or [t for h, t in starts.get(i, ()) if t >= t_fault]
        if later:
            delays.append(max(0.0, min(later) - t_fault))
    out.redelivery_s = max(delays) if delays else None
    # Stalls count only while work that nobody else held was still queued.
    held_set = set(held) | redelivered
    wanted = set(ids)
    fresh_starts = [t for i, runs in starts.items() if i in wanted and i not in held_set for _, t in runs]
    if fresh_starts:
        window = (min(fresh_starts), max(fresh_starts))
        for h in (f"h{n}" for n in range(1, hosts)):
            times = sorted(t for t in events.get(h, ()) if window[0] <= t <= window[1])
            gaps = [b - a for a, b in itertools.pairwise(times)]
            out.stall_s = max([out.stall_s, *gaps])
    return out
