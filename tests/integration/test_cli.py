"""``celery -A mod tq ...`` as a user runs it: on a terminal, piped, and against servers that are down."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from celery_tq.testing import WorkerProcess
from tests.ports import free_port

# Under pytest-xdist the whole module runs in one worker: the module-scoped run of the demo shop, once.
pytestmark = pytest.mark.xdist_group("cli")

ROOT = Path(__file__).parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def tq(data: Path, *args: str, app: str = "examples.shop", **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "TQ_DATA_DIR": str(data), "PYTHONPATH": f"{data}:{ROOT}", **env}
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"):  # piped unless a test says otherwise
        if name not in env:
            environ.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", app, "tq", *args],
        cwd=data,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def on_terminal(data: Path, *args: str, columns: int = 80) -> str:
    done = tq(data, *args, TTY_COMPATIBLE="1", COLUMNS=str(columns))
    assert done.returncode == 0, done.stderr
    return ANSI.sub("", done.stdout)


@dataclass
class Ran:
    data: Path
    failed_id: str
    vip_id: str


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ran]:
    """The demo shop's failing invoice load, a VIP charge and a receipt, run by a real worker."""
    data = tmp_path_factory.mktemp("cli")
    script = textwrap.dedent(
        """
        from examples import shop
        failed = shop.load_invoice.delay(7)
        vip = shop.charge.apply_async((5, 9.5), tags={"vip"})
        receipt = shop.send_receipt.delay(3)
        for r in (vip, receipt):
            r.get(timeout=60)
        try:
            failed.get(timeout=60)
        except Exception:
            pass
        print(failed.id, vip.id)
        """
    )
    env = {"TQ_DATA_DIR": str(data), "PYTHONPATH": str(ROOT)}
    with WorkerProcess("examples.shop", cwd=ROOT, env=env):
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    failed_id, vip_id = done.stdout.split()
    yield Ran(data, failed_id, vip_id)


def test_tasks_piped_prints_tab_separated_columns_with_whole_ids(ran: Ran) -> None:
    done = tq(ran.data, "tasks")
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split("\t") == [
        "id", "name", "state", "prio", "tags", "queue", "submitted", "runtime", "tries", "error",
    ]  # fmt: skip
    assert len(rows) == 3 and "\x1b" not in done.stdout
    by_id = {row.split("\t")[0]: row.split("\t") for row in rows}
    failed = by_id[ran.failed_id]
    assert failed[1:6] == ["shop.load_invoice", "FAILURE", "5", "billing", "tq.default"]
    assert re.fullmatch(r"\d+(\.\d)? ms", failed[7])
    assert failed[9] == "IoError: I/O error: No such file or directory (/nonexistent/invoices/7.pdf)"
    assert by_id[ran.vip_id][4] == "billing,vip"


def test_tasks_on_an_80_column_terminal_cuts_no_cell(ran: Ran) -> None:
    out = on_terminal(ran.data, "tasks", columns=80)
    assert "…" not in out
    assert all(len(line) <= 80 for line in out.splitlines())
    assert ran.failed_id[:8] in out and "shop.load_invoice" in out and "FAILURE" in out
    joined = " ".join(out.split())
    assert "IoError: I/O error: No such file or directory (/nonexistent/invoices/7.pdf)" in joined
    assert "IoError: IoError" not in joined


def test_show_takes_the_short_id_tasks_prints(ran: Ran) -> None:
    short = re.search(r"^ ?([0-9a-f]{8,})\s+shop\.load_invoice", on_terminal(ran.data, "tasks"), re.M)
    assert short is not None
    done = tq(ran.data, "show", short.group(1))
    assert done.returncode == 0, done.stderr
    assert ran.failed_id in done.stdout


def test_show_prints_the_whole_chain_with_the_users_frames_and_readable_fields(ran: Ran) -> None:
    done = tq(ran.data, "show", ran.failed_id)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert 'examples/shop.py", line' in out and "in _read_pdf" in out  # the user's own frames
    assert "FileNotFoundError" in out
    assert "The above exception was the direct cause of the following exception" in out
    assert out.index("FileNotFoundError") < out.index("celery_tq.errors.IoError")
    assert re.search(r"runtime\s+│ \d+(\.\d)? ms", out)
    assert re.search(r"submitted_at\s+│ \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}", out)
    vip = tq(ran.data, "show", ran.vip_id).stdout
    assert re.search(r"tags\s+│ billing, vip\s", vip)


@pytest.mark.parametrize("word", ["FAILED", "failure", "Failed"])
def test_tasks_takes_flowers_state_words_in_any_case(ran: Ran, word: str) -> None:
    done = tq(ran.data, "tasks", "--state", word)
    assert done.returncode == 0, done.stderr
    assert [row.split("\t")[0] for row in done.stdout.splitlines()[1:]] == [ran.failed_id]


def test_unknown_state_is_a_one_line_usage_error(ran: Ran) -> None:
    done = tq(ran.data, "tasks", "--state", "exploded")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "not a task state" in done.stderr


def test_status_says_none_in_an_empty_panel(ran: Ran) -> None:
    out = on_terminal(ran.data, "status", "--once", columns=120)
    running = out[out.index("Running") :]
    assert "none" in running.splitlines()[4]  # title, top rule, header, rule, first row


def write_app(path: Path, name: str, body: str) -> None:
    (path / f"{name}.py").write_text("from celery import Celery\nimport celery_tq\n" + textwrap.dedent(body))


def test_check_reports_an_unreachable_broker_and_store_as_errors_and_exits_one(tmp_path: Path) -> None:
    port = free_port()
    write_app(
        tmp_path,
        "down",
        f"""
        app = Celery("down")
        tq = celery_tq.install(app, preset="development")
        app.conf.broker_url = "redis://127.0.0.1:{port}/0"
        app.conf.result_backend = "tq+redis://:secret@127.0.0.1:{port}/0"
        """,
    )
    done = tq(tmp_path, "check", "--json", app="down")
    assert done.returncode == 1, done.stdout + done.stderr
    assert '"broker-unreachable"' in done.stdout and '"store-unreachable"' in done.stdout
    assert '"level": "error"' in done.stdout and "secret" not in done.stdout
    offline = tq(tmp_path, "check", "--offline", app="down")
    assert offline.returncode == 0, offline.stdout + offline.stderr


def test_check_on_an_app_without_install_is_one_line_and_exits_one(tmp_path: Path) -> None:
    write_app(tmp_path, "bare", 'app = Celery("bare")\n')
    done = tq(tmp_path, "check", app="bare")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip() == "celery-tq check: celery_tq.install(app) was not called for this app"
