"""The README's Quick start runs as written, and so does every ``celery -A ... tq ...`` it shows.

The code is read from README.md itself, never copied here: a README edit that breaks a snippet
breaks this test.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_tq.testing import WorkerProcess
from tests.ports import free_port

# Under pytest-xdist the whole module runs in one worker: the Quick start project and its worker, once.
pytestmark = pytest.mark.xdist_group("readme")

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
TQ_COMMAND = re.compile(r"celery -A [\w.]*\w tq [a-z][^`\n#]*")
RUNS_UNTIL_STOPPED = ("status", "exporter")  # without --once


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def readme_tq_commands() -> list[str]:
    """Every ``celery -A <app> tq ...`` in README.md (code blocks and inline code), in order."""
    seen: dict[str, None] = {}
    for match in TQ_COMMAND.finditer(README):
        seen.setdefault(" ".join(match.group(0).split()), None)
    return list(seen)


def quick_start() -> tuple[str, str, str]:
    """(shop.py, the worker command, the caller snippet) as the Quick start shows them."""
    text = section("Quick start")
    module, caller = blocks(text, "python")[:2]
    assert module.startswith("# shop.py\n")
    [worker] = [line for body in blocks(text, "sh") for line in body.splitlines() if " worker" in line]
    return module, worker.split("#")[0].strip(), caller


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with the Quick start's shop.py and its worker running there, as written."""
    path = tmp_path_factory.mktemp("quickstart")
    module, worker_line, _ = quick_start()
    (path / "shop.py").write_text(module)
    argv = shlex.split(worker_line)
    assert argv[:3] == ["celery", "-A", "shop"] and argv[3] == "worker", worker_line
    worker = WorkerProcess("shop", cwd=path, env={"PYTHONPATH": str(path)}, extra_args=argv[4:])
    worker.env.pop("TQ_DATA_DIR", None)  # the preset's own default: ./.celery_tq
    with worker:
        yield path


@pytest.fixture(scope="module")
def caller_run(project: Path) -> subprocess.CompletedProcess[str]:
    """The Quick start's caller snippet, run as a script in the project directory."""
    _, _, caller = quick_start()
    (project / "caller.py").write_text(caller)
    return run(project, [sys.executable, "caller.py"])


def run(path: Path, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TQ_DATA_DIR", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["PYTHONPATH"] = str(path)
    return subprocess.run(argv, cwd=path, env=env, capture_output=True, text=True, timeout=timeout)


def test_readme_lists_the_tq_commands_it_shows() -> None:
    commands = readme_tq_commands()
    for sub in ("check", "tasks", "show", "status", "purge", "lost", "exporter"):
        assert any(c.split()[4] == sub for c in commands), f"README shows no `tq {sub}`"


def test_quick_start_caller_runs_as_written_against_a_real_worker(
    project: Path, caller_run: subprocess.CompletedProcess[str]
) -> None:
    done = caller_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert "{'order_id': 5}" in done.stdout
    assert "order_id must be positive ['charging order -1']" in done.stdout
    assert (project / ".celery_tq" / "results.db").exists()  # where the preset's comment says


def test_every_tq_command_in_the_readme_runs_on_the_quick_start_app(
    project: Path, caller_run: subprocess.CompletedProcess[str]
) -> None:
    assert caller_run.returncode == 0, caller_run.stderr
    listed = run(project, [sys.executable, "-m", "celery", "-A", "shop", "tq", "tasks", "--state", "FAILURE"])
    failed_id = listed.stdout.splitlines()[1].split("\t")[0]
    for command in readme_tq_commands():
        argv = shlex.split(command)
        argv[:3] = [sys.executable, "-m", "celery", "-A", "shop"]  # whatever app the README names
        argv = [failed_id if ("..." in a or a.startswith("<")) else a for a in argv]
        if "--port" in argv:
            argv[argv.index("--port") + 1] = str(free_port())
        if argv[6] in RUNS_UNTIL_STOPPED and "--once" not in argv:
            assert_keeps_running(project, argv, command)
            continue
        done = run(project, argv)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr, command


def assert_keeps_running(path: Path, argv: list[str], command: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TQ_DATA_DIR"}
    env["PYTHONPATH"] = str(path)
    proc = subprocess.Popen(
        argv, cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, f"{command} stopped: {proc.communicate()}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_testing_your_tasks_snippets_pass_under_pytest_in_the_users_project(project: Path) -> None:
    """The "Testing your tasks" ini and tests, in the Quick start's project, run by pytest there:
    the plugin is found through its entry point, as in any project that installed celery-tq."""
    text = section("Testing your tasks")
    [ini] = blocks(text, "ini")
    [tests] = blocks(text, "python")
    (project / "pytest.ini").write_text(ini)
    (project / "test_shop.py").write_text(tests)
    done = run(project, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_shop.py"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
