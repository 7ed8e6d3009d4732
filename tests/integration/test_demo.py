"""The main job: ``python examples/demo.py`` runs the workload on the embedded default, with a
Flower of its own, and stops everything it started however it is stopped."""

from __future__ import annotations

import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.waiting import wait_for

ROOT = Path(__file__).parents[2]


def demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "TQ_DATA_DIR": str(tmp_path / "demo"), "COLUMNS": "200", **extra}
    if "TQ_ENV" not in extra:
        env.pop("TQ_ENV", None)
    return env


def test_demo_runs_the_mixed_workload_and_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    done = subprocess.run(
        [sys.executable, "examples/demo.py", "--once", "--port", str(port)],
        cwd=ROOT,
        env=demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "stock synced after 2 retries" in out
    assert "TaskTimeout" in out and "IoError" in out and "loading invoice 7" in out
    assert out.count("billing,vip") == 3
    assert f"http://127.0.0.1:{port}/tasks" in out
    printed = re.search(r"`(TQ_DATA_DIR=\S+ celery -A examples.shop tq tasks)`", out)
    assert printed is not None and printed.group(1).startswith(f"TQ_DATA_DIR={tmp_path / 'demo'} ")
    env = {k: v for k, v in os.environ.items() if k not in ("TQ_DATA_DIR", "FORCE_COLOR", "TTY_COMPATIBLE")}
    celery = str(Path(sys.executable).with_name("celery"))
    listed = subprocess.run(  # the command as the demo printed it
        printed.group(1).replace(" celery ", f" {celery} "), shell=True, cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 1 + 9  # header and the nine tasks


def test_examples_shop_finds_the_demos_files_from_the_checkout_without_a_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TQ_DATA_DIR"}
    code = "from examples import shop; print(shop.app.conf.result_backend)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.stdout.strip() == f"tq+sqlite:///{ROOT.resolve() / '.celery_tq' / 'demo' / 'results.db'}"


@pytest.fixture
def other_flower() -> Iterator[int]:
    """Another program on a port, answering /healthcheck as a Flower would."""

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", free_port()), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" if Path("/proc").exists() else True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_demo_with_its_port_taken_uses_its_own_flower_and_stops_everything_on_a_signal(
    tmp_path: Path, other_flower: int, signum: int
) -> None:
    log = tmp_path / "demo.out"
    with log.open("w") as out:
        demo = subprocess.Popen(
            [sys.executable, "examples/demo.py", "--port", str(other_flower)],
            cwd=ROOT,
            env=demo_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: "keep running" in log.read_text() or demo.poll() is not None, 150, "the demo")
        text = log.read_text()
        assert demo.poll() is None, text
        assert f"port {other_flower} is taken" in text
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/tasks", text).group(1))  # type: ignore[union-attr]
        assert port != other_flower
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers", timeout=10) as answer:
            assert answer.status == 200  # a real Flower, not the other program
        worker, flower = (int(p) for p in re.search(r"pid (\d+)\) and Flower \(pid (\d+)", text).groups())  # type: ignore[union-attr]
        assert alive(worker) and alive(flower)
        demo.send_signal(signum)
        demo.wait(60)
        wait_for(lambda: not alive(worker) and not alive(flower), 30, "worker and Flower to stop")
        assert "stopping the worker and Flower" in log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)


def test_demo_says_clearly_when_flower_cannot_start(tmp_path: Path) -> None:
    done = subprocess.run(  # production Flower refuses to start without authentication
        [sys.executable, "examples/demo.py", "--once", "--port", str(free_port())],
        cwd=ROOT,
        env=demo_env(tmp_path, TQ_ENV="production"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Flower did not start on port" in done.stdout
    assert "authentication" in done.stdout.replace("\n", " ")
    assert "Traceback" not in done.stdout + done.stderr


def test_make_demo_installs_only_what_the_demo_needs(tmp_path: Path) -> None:
    plan = subprocess.run(
        ["make", "-n", "demo", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs == [f'{tmp_path / "venv"}/bin/python -m pip install -q -e ".[flower]"']
