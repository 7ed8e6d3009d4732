"""Flower, started by the test with config/flowerconfig.py, shows our tasks with their tq metadata.

Real ``celery flower`` and ``celery worker`` processes on the embedded broker and on Redis. The tq
metadata reaches Flower through ``kwargsrepr`` (custom event fields never do), so it shows in the
``kwargs`` of the API, the task list and the task page, and Flower's search finds it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.ports import free_port

from .conftest import APPS, Shop

ROOT = Path(__file__).parents[2]
FLOWERCONFIG = ROOT / "config" / "flowerconfig.py"
REFUSAL = "refusing to start Flower in production without authentication"


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect (e.g. to an OAuth provider) is the answer, not something to follow


_NO_REDIRECTS = urllib.request.build_opener(_KeepRedirects)


class FlowerProcess:
    """``celery -A tqshop flower --conf=config/flowerconfig.py`` as a subprocess of its own group."""

    def __init__(self, broker_url: str, result_backend: str, log_dir: Path, env: Mapping[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tqshop",
            "flower",
            "--address=127.0.0.1",
            f"--port={self.port}",
            f"--conf={FLOWERCONFIG}",
        ]
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "TQ_FLOWER_", "TQ_ENV"))
        }
        self.env = {
            **inherited,
            "TQSHOP_BROKER_URL": broker_url,
            "TQSHOP_RESULT_BACKEND": result_backend,
            "TQ_DATA_DIR": str(log_dir),
            "PYTHONPATH": f"{APPS}:{ROOT}",
            **env,
        }
        name = f"flower-{uuid.uuid4().hex[:8]}"
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def log(self) -> str:
        out = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        return out + self.stderr

    def start(self, wait: bool = True, timeout: float = 30.0) -> FlowerProcess:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                self.args, env=self.env, cwd=ROOT, stdout=out, stderr=err, start_new_session=True
            )
        if not wait:
            return self
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError):
                if self.get("/healthcheck")[0] == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"Flower did not start: {' '.join(self.args)}\n{self.log[-3000:]}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"Flower kept running:\n{self.log[-3000:]}")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (Flower saves its state then), SIGKILL of the group after ``grace`` seconds."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(10)
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def get(self, path: str, auth: str | None = None, timeout: float = 10.0) -> tuple[int, str]:
        """(status, body) of a GET; ``auth`` is ``"user:password"`` for basic auth."""
        request = urllib.request.Request(self.url + path)
        if auth is not None:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        try:
            with _NO_REDIRECTS.open(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.read().decode(errors="replace")

    def get_json(self, path: str, auth: str | None = None) -> Any:
        status, body = self.get(path, auth)
        assert status == 200, f"GET {path} -> {status}: {body[:500]}"
        return json.loads(body)

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Poll ``probe`` until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"Flower never showed {what}; its log:\n{self.log[-3000:]}")
            time.sleep(0.2)


StartFlower = Callable[..., FlowerProcess]


@pytest.fixture
def start_flower(data_dir: str) -> Iterator[StartFlower]:
    """``start_flower(broker_url, result_backend, env={...}, wait=True)``; every Flower is stopped after."""
    started: list[FlowerProcess] = []

    def start(
        broker_url: str, result_backend: str, *, env: Mapping[str, str] | None = None, wait: bool = True
    ) -> FlowerProcess:
        flower = FlowerProcess(broker_url, result_backend, Path(data_dir), env or {})
        started.append(flower)
        return flower.start(wait=wait)

    yield start
    for flower in started:
        flower.stop(grace=1.0)  # its thread pool can keep it alive for seconds; nothing to save


DEVELOPMENT = {"TQ_ENV": "development", "FLOWER_UNAUTHENTICATED_API": "1"}


@pytest.mark.parametrize("kind", ["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def test_flower_shows_state_tags_and_priority_and_finds_tasks_by_tag(
    kind: str, request: pytest.FixtureRequest, start_flower: StartFlower
) -> None:
    shop: Shop = request.getfixturevalue(f"{kind}_shop")
    flower = start_flower(shop.broker_url, shop.result_backend, env=DEVELOPMENT)
    hostname = f"flower-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    shop.start_worker(hostname=hostname)

    ok = shop.app.tasks["tqshop.echo_meta"].apply_async(("flower",), priority=9, tags={"vip"}, timeout=10)
    bad = shop.app.tasks["tqshop.raise_error"].apply_async(
        ("InvalidInput", ["card declined"]), priority=8, tags={"refunds"}
    )
    assert ok.get(timeout=30)["tags"] == ["billing", "vip"]
    with pytest.raises(ValueError, match="card declined"):
        bad.get(timeout=30)

    def info(task_id: str, state: str) -> dict[str, Any] | None:
        status, body = flower.get(f"/api/task/info/{task_id}")
        task = json.loads(body) if status == 200 else None
        return task if task and task["state"] == state and task["kwargs"] else None

    ok_info = flower.wait_for("the succeeded task", lambda: info(ok.id, "SUCCESS"))
    assert ok_info["name"] == "tqshop.echo_meta"
    assert ok_info["kwargs"] == "{} [tq priority=9 tags=billing,vip timeout=10]"
    assert ok_info["worker"] == hostname
    bad_info = flower.wait_for("the failed task", lambda: info(bad.id, "FAILURE"))
    assert "priority=8" in bad_info["kwargs"] and "tags=refunds" in bad_info["kwargs"]
    assert "card declined" in bad_info["exception"]

    tasks = flower.get_json("/api/tasks")
    assert tasks[ok.id]["state"] == "SUCCESS" and "tags=billing,vip" in tasks[ok.id]["kwargs"]
    assert tasks[bad.id]["state"] == "FAILURE" and "tags=refunds" in tasks[bad.id]["kwargs"]

    # Flower's search covers kwargs, so a tag, a priority or the tq marker finds the task.
    assert set(flower.get_json("/api/tasks?search=vip")) == {ok.id}
    assert set(flower.get_json("/api/tasks?search=refunds")) == {bad.id}
    assert set(flower.get_json("/api/tasks?search=priority%3D9")) == {ok.id}
    assert set(flower.get_json("/api/tasks?search=%22%5Btq%22")) == {ok.id, bad.id}

    flower.wait_for(
        "the worker in /api/workers", lambda: hostname in flower.get_json("/api/workers?refresh=1")
    )


@pytest.mark.rabbitmq
def test_flower_started_beside_an_unwatched_rabbitmq_worker_shows_its_new_tasks(
    rabbitmq_shop: Shop, start_flower: StartFlower
) -> None:
    """With nobody listening the worker pauses its task events; Flower connecting resumes them."""
    worker = rabbitmq_shop.start_worker()
    before = rabbitmq_shop.app.tasks["tqshop.add"].delay(1, 1)
    assert before.get(timeout=30) == 2
    deadline = time.monotonic() + 10
    while "Task events paused" not in worker.log and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "Task events paused" in worker.log

    flower = start_flower(rabbitmq_shop.broker_url, rabbitmq_shop.result_backend, env=DEVELOPMENT)
    flower.wait_for("its monitor to reach the worker", lambda: "Task events resumed" in worker.log)
    task = rabbitmq_shop.app.tasks["tqshop.echo_meta"].apply_async(("seen",), priority=7, tags={"vip"})
    assert task.get(timeout=30)["priority"] == 7

    def info() -> dict[str, Any] | None:
        status, body = flower.get(f"/api/task/info/{task.id}")
        shown = json.loads(body) if status == 200 else None
        return shown if shown and shown["state"] == "SUCCESS" else None

    shown = flower.wait_for("the task sent after it connected", info)
    assert shown["kwargs"] == "{} [tq priority=7 tags=billing,vip timeout=30]"
    assert shown["received"] and shown["started"]


def test_production_without_credentials_refuses_to_start(
    embedded_shop: Shop, start_flower: StartFlower
) -> None:
    flower = start_flower(
        embedded_shop.broker_url, embedded_shop.result_backend, env={"TQ_ENV": "production"}, wait=False
    )
    assert flower.wait_exit() != 0
    assert REFUSAL in flower.stderr
    assert "Traceback" not in flower.log


def test_production_basic_auth_guards_the_api_but_not_metrics(
    embedded_shop: Shop, start_flower: StartFlower, data_dir: str
) -> None:
    db = Path(data_dir) / "flower-state"
    flower = start_flower(
        embedded_shop.broker_url,
        embedded_shop.result_backend,
        env={
            "TQ_ENV": "production",
            "TQ_FLOWER_BASIC_AUTH": "ops:s3cret,viewer:other",
            "TQ_FLOWER_DB": str(db),
        },
    )
    assert flower.get("/api/tasks")[0] == 401
    assert flower.get("/api/tasks", auth="ops:wrong")[0] == 401
    assert flower.get("/", auth=None)[0] == 401
    assert flower.get("/api/tasks", auth="ops:s3cret") == (200, "{}")
    assert flower.get("/api/tasks", auth="viewer:other")[0] == 200
    # Flower exempts these two from every kind of auth: keep them behind the reverse proxy.
    assert flower.get("/metrics")[0] == 200
    assert flower.get("/healthcheck") == (200, "OK")

    flower.stop()
    assert list(db.parent.glob(f"{db.name}*")), "TQ_FLOWER_DB: Flower saved no state file"


def test_production_accepts_oauth_set_through_flowers_own_environment(
    embedded_shop: Shop, start_flower: StartFlower
) -> None:
    oauth = {
        "FLOWER_AUTH": r".*@example\.com",
        "FLOWER_AUTH_PROVIDER": "flower.views.auth.GithubLoginHandler",
        "FLOWER_OAUTH2_KEY": "key",
        "FLOWER_OAUTH2_SECRET": "secret",
        "FLOWER_OAUTH2_REDIRECT_URI": "http://127.0.0.1/login",
    }
    flower = start_flower(
        embedded_shop.broker_url, embedded_shop.result_backend, env={"TQ_ENV": "production", **oauth}
    )
    status, _ = flower.get("/api/tasks")
    assert status == 302, status  # to the login page
    assert REFUSAL not in flower.log


@pytest.mark.parametrize("kind", ["redis", "embedded"])
def test_flower_with_the_broker_down_logs_and_retries_without_a_traceback(
    kind: str, data_dir: str, start_flower: StartFlower
) -> None:
    if kind == "redis":
        broker_url, error = f"redis://127.0.0.1:{free_port()}/0", "Connection refused"
    else:  # the embedded broker's file cannot be created: its "directory" is a regular file
        (Path(data_dir) / "not-a-dir").write_text("")
        broker_url, error = f"tq+sqlite:///{data_dir}/not-a-dir/broker.db", "not-a-dir"
    flower = start_flower(broker_url, f"db+sqlite:///{data_dir}/results.db", env=DEVELOPMENT)
    assert flower.get("/healthcheck") == (200, "OK")  # it serves while it waits for the broker
    flower.wait_for("a retry", lambda: "trying again in" in flower.log)
    log = flower.log
    assert "Failed to capture events" in log and error in log
    assert "Traceback" not in log
    assert flower.process is not None and flower.process.poll() is None


class TestConfigModule:
    """config/flowerconfig.py read the way Flower reads it (executed, its globals taken as options)."""

    @staticmethod
    def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, Any]:
        for name in [n for n in os.environ if n.startswith(("TQ_FLOWER_", "FLOWER_"))] + ["TQ_ENV"]:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return runpy.run_path(str(FLOWERCONFIG))

    def test_development_binds_localhost_and_shows_kwargs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        conf = self.load(monkeypatch)
        assert (conf["address"], conf["port"]) == ("127.0.0.1", 5555)
        assert "kwargs" in conf["tasks_columns"].split(",")
        assert "persistent" not in conf and "basic_auth" not in conf
        conf = self.load(monkeypatch, TQ_FLOWER_PORT="5599", TQ_FLOWER_DB="state/flower")
        assert (conf["port"], conf["persistent"], conf["db"]) == (5599, True, os.path.abspath("state/flower"))

    def test_production_takes_basic_auth(self, monkeypatch: pytest.MonkeyPatch) -> None:
        conf = self.load(monkeypatch, TQ_ENV="production", TQ_FLOWER_BASIC_AUTH="a:1, b:2")
        assert conf["basic_auth"] == ["a:1", "b:2"]
        assert conf["address"] == "0.0.0.0"

    @pytest.mark.parametrize(
        ("env", "message"),
        [
            ({"TQ_ENV": "production"}, REFUSAL),
            ({"TQ_ENV": "production", "TQ_FLOWER_BASIC_AUTH": "nopassword"}, "must be 'user:password'"),
            ({"TQ_ENV": "staging"}, "TQ_ENV must be"),
            ({"TQ_FLOWER_PORT": "http"}, "TQ_FLOWER_PORT must be"),
        ],
    )
    def test_bad_settings_stop_with_one_line(
        self, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
    ) -> None:
        with pytest.raises(SystemExit) as exc:
            self.load(monkeypatch, **env)
        assert message in str(exc.value) and "\n" not in str(exc.value)

    def test_pages_show_the_tq_metadata_before_the_kwargs(self, monkeypatch: pytest.MonkeyPatch) -> None:
        format_task = self.load(monkeypatch)["format_task"]
        task = SimpleNamespace(kwargs="{'order': [1, 2]} [tq priority=9 tags=billing,vip timeout=10]")
        assert format_task(task).kwargs == "[tq priority=9 tags=billing,vip timeout=10] {'order': [1, 2]}"
        for untouched in ("{'a': 1}", None, "{'note': ' [tq x]'} trailing"):
            assert format_task(SimpleNamespace(kwargs=untouched)).kwargs == untouched
