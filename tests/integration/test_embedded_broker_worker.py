"""Real ``celery worker`` processes on the embedded ``tq+sqlite://`` broker."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celery_tq.testing import WorkerProcess
from tests.processes import children

APP = """
import os
from pathlib import Path

from celery import Celery

from celery_tq.transport import register_transports

register_transports()
DATA = Path(os.environ["TQ_DATA_DIR"])
app = Celery("tqapp", broker=f"tq+sqlite:///{DATA}/broker.db", backend=f"file://{DATA}/results")
app.conf.update(
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    broker_transport_options={"polling_interval": 0.01},
    broker_connection_retry_on_startup=True,
)


@app.task
def add(x, y):
    return x + y


@app.task
def record(seq, prio):
    with open(DATA / "order.txt", "a") as f:
        f.write(f"{seq} {prio}\\n")
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tqapp.py").write_text(textwrap.dedent(APP))
    data = tmp_path / "data"
    (data / "results").mkdir(parents=True)
    repo = str(Path(__file__).parents[2])
    return {
        **os.environ,
        "TQ_DATA_DIR": str(data),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), repo]),
        "PYTHONWARNINGS": "ignore",
    }


def run(env: dict[str, str], *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=env["TQ_DATA_DIR"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def worker(env: dict[str, str]) -> Iterator[Callable[[], Path]]:
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def start() -> Path:
        log = Path(env["TQ_DATA_DIR"]) / f"worker{len(procs)}.log"
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "tqapp",
                        "worker",
                        "-P",
                        "prefork",
                        "-c",
                        "1",
                        "-n",
                        f"w{len(procs)}@%h",
                        "--loglevel=INFO",
                    ],
                    env=env,
                    cwd=env["TQ_DATA_DIR"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        logs.append(log)
        deadline = time.monotonic() + 20
        while b"ready." not in log.read_bytes():
            assert procs[-1].poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        return log

    yield start
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def test_round_trip(env: dict[str, str], worker: Callable[[], Path]) -> None:
    worker()
    # The link is published by the prefork child: the connection must survive the fork.
    code = (
        "from tqapp import add\n"
        "link = add.s(10).set(task_id='linked-1')\n"
        "print(add.apply_async((2, 3), link=link).get(timeout=10))\n"
        "print(add.AsyncResult('linked-1').get(timeout=10))\n"
    )
    done = run(env, "-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "15"]


def test_inspect_ping(env: dict[str, str], worker: Callable[[], Path]) -> None:
    worker()
    done = run(env, "-m", "celery", "-A", "tqapp", "inspect", "ping", "--timeout", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pong" in done.stdout and "1 node online" in done.stdout


def test_queued_tasks_run_in_strict_priority_order(env: dict[str, str], worker: Callable[[], Path]) -> None:
    rnd = random.Random(3)
    prios = [rnd.randint(0, 9) for _ in range(30)]
    code = (
        "from tqapp import record\n"
        f"for seq, prio in enumerate({prios!r}):\n"
        "    record.apply_async((seq, prio), priority=prio)\n"
    )
    done = run(env, "-c", code)
    assert done.returncode == 0, done.stderr
    log = worker()
    order = Path(env["TQ_DATA_DIR"]) / "order.txt"
    deadline = time.monotonic() + 20
    while not order.exists() or len(order.read_text().splitlines()) < 30:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    ran = [tuple(map(int, line.split())) for line in order.read_text().splitlines()]
    expected = sorted(enumerate(prios), key=lambda sp: (-sp[1], sp[0]))
    assert ran == expected


DEV_APP = """
from celery import Celery

import celery_tq

app = Celery("devapp")
celery_tq.install(app, preset="development")


@app.task(name="devapp.add")
def add(x, y):
    return x + y
"""


def test_pool_processes_killed_while_idle_are_replaced_and_the_worker_runs_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of the prefork pool processes while they wait for a task (the OOM killer does the
    same): the development preset's worker replaces them and runs every task sent afterwards.
    Without the event loop, billiard's shared job queue kept the lock of the process that was
    reading it, and the worker never ran another task."""
    (tmp_path / "devapp.py").write_text(textwrap.dedent(DEV_APP))
    monkeypatch.setenv("TQ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import devapp

    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[2])])}
    with WorkerProcess("devapp", pool="prefork", concurrency=2, cwd=tmp_path, env=env) as worker:
        assert devapp.add.delay(1, 2).get(timeout=30) == 3
        pool = children(worker.pid)
        assert len(pool) == 2, worker.log
        time.sleep(0.5)  # both idle, waiting for a task (one of them holding billiard's read lock)
        for pid in pool:
            os.kill(pid, signal.SIGKILL)
        results = [devapp.add.delay(i, i) for i in range(6)]
        assert [r.get(timeout=30) for r in results] == [2 * i for i in range(6)], worker.log
        assert worker.log.count("exited with 'signal 9 (SIGKILL)'") == 2
    sys.modules.pop("devapp", None)
