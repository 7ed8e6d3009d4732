"""``check()`` and ``celery -A mod tq check``: configuration findings, each with a fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, _state

import celery_tq
from celery_tq import TqTask
from celery_tq.checks import Finding

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The development preset keeps files under TQ_DATA_DIR; shared tasks would leak into later apps."""
    monkeypatch.setenv("TQ_DATA_DIR", str(tmp_path))
    before = set(_state._on_app_finalizers)
    yield
    _state._on_app_finalizers.intersection_update(before)


def check(preset: str = "testing", broker: str | None = None, **settings: Any) -> list[Finding]:
    app = Celery("t", broker=broker)
    app.conf.update(settings)
    return celery_tq.install(app, preset=preset).check()


def codes(findings: list[Finding], level: str | None = None) -> set[str]:
    return {f.code for f in findings if level is None or f.level == level}


def test_development_preset_has_no_errors() -> None:
    assert codes(check("development"), "error") == set()


def test_development_preset_has_no_findings_at_all() -> None:
    assert check("development") == []


def test_production_preset_on_redis_has_no_errors() -> None:
    assert codes(check("production", broker=REDIS_URL), "error") == set()


@pytest.mark.parametrize(
    "settings",
    [
        {"accept_content": ["json", "pickle"]},
        {"accept_content": ["application/x-python-serialize"]},
        {"result_accept_content": ["pickle"]},
        {"task_serializer": "pickle"},
        {"result_serializer": "pickle"},
    ],
)
def test_install_refuses_a_config_that_allows_pickle(settings: dict[str, Any]) -> None:
    app = Celery("t")
    app.conf.update(settings)
    assert app.conf.broker_url is None  # the first read configures the app
    with pytest.raises(celery_tq.errors.ConfigurationError, match="allow pickle"):
        celery_tq.install(app, preset="testing")


def test_sending_a_task_refuses_pickle_set_after_install() -> None:
    app = Celery("t")
    tq = celery_tq.install(app, preset="testing")

    @tq.task(name="t.noop", shared=False)
    def noop() -> None: ...

    app.conf.update(accept_content=["json", "pickle"])
    with pytest.raises(celery_tq.errors.ConfigurationError, match="accept_content allow pickle"):
        noop.delay()


def test_pickle_is_allowed_with_the_documented_opt_out() -> None:
    app = Celery("t")
    app.conf.update(accept_content=["json", "pickle"], tq_allow_pickle=True)
    assert app.conf.broker_url is None
    celery_tq.install(app, preset="testing")  # no error


@pytest.mark.parametrize(
    "settings",
    [
        {"accept_content": ["json", "pickle"]},
        {"accept_content": ["application/x-python-serialize"]},
        {"result_accept_content": ["pickle"]},
        {"task_serializer": "pickle"},
        {"result_serializer": "pickle"},
    ],
)
def test_accepting_pickle_is_an_error(settings: dict[str, Any]) -> None:
    settings = {**settings, "tq_allow_pickle": True}  # the documented opt-out; check still objects
    findings = check(**settings)
    assert "pickle-accepted" in codes(findings, "error")


def test_pickle_finding_spells_out_the_fix() -> None:
    findings = check(accept_content=["json", "pickle"], tq_allow_pickle=True)
    [finding] = [f for f in findings if f.code == "pickle-accepted"]
    assert "pickle" in finding.message
    assert "json" in finding.fix


def test_memory_broker_warns_that_priority_is_ignored() -> None:
    findings = check("testing")
    assert "priority-ignored" in codes(findings, "warning")
    assert codes(findings, "error") == set()


@pytest.mark.parametrize("broker", ["filesystem://", "sqla+sqlite:///x.db", "sqs://"])
def test_other_brokers_without_priority_warn_too(broker: str) -> None:
    assert "priority-ignored" in codes(check(broker=broker), "warning")


@pytest.mark.parametrize("broker", [AMQP_URL, REDIS_URL, "tq+sqlite:///tmp/broker.db"])
def test_brokers_with_priority_do_not_warn_about_it(broker: str) -> None:
    assert "priority-ignored" not in codes(check(broker=broker))


def test_prefetch_multiplier_above_one_warns_that_it_defeats_priority() -> None:
    findings = check("development", worker_prefetch_multiplier=4)
    [finding] = [f for f in findings if f.code == "prefetch-defeats-priority"]
    assert finding.level == "warning"
    assert "4" in finding.message
    assert "worker_prefetch_multiplier = 1" in finding.fix


@pytest.mark.parametrize("preset", ["development", "production"])
def test_prefetch_multiplier_above_one_only_warns_about_order(preset: str) -> None:
    """The embedded broker's worker runs an event loop too: reserved tasks never stall it."""
    findings = check(
        preset, broker=AMQP_URL if preset == "production" else None, worker_prefetch_multiplier=4
    )
    [finding] = [f for f in findings if f.code == "prefetch-defeats-priority"]
    assert "control commands" not in finding.message


def test_prefetch_extra_above_one_warns_that_it_widens_the_order_bound() -> None:
    [finding] = [f for f in check(tq_prefetch_extra=3) if f.code == "prefetch-extra-defeats-priority"]
    assert finding.level == "warning"
    assert "concurrency + 3" in finding.message
    assert "prefetch-extra-defeats-priority" not in codes(check())


def test_redis_priority_steps_that_merge_levels_are_an_error() -> None:
    findings = check(broker=REDIS_URL, broker_transport_options={"priority_steps": [0, 3, 6, 9]})
    [finding] = [f for f in findings if f.code == "redis-priority-steps"]
    assert finding.level == "error"
    assert "4 levels" in finding.message


def test_redis_with_the_steps_install_sets_is_clean() -> None:
    assert "redis-priority-steps" not in codes(check(broker=REDIS_URL))


def test_timed_task_on_a_gevent_pool_is_an_error() -> None:
    app = Celery("t")
    app.conf.update(worker_pool="gevent")
    tq = celery_tq.install(app, preset="development")

    @tq.task(timeout=30)
    def charge(order_id: int) -> None:
        return None

    [finding] = [f for f in tq.check() if f.code == "pool-cannot-enforce-timeouts"]
    assert finding.level == "error"
    assert charge.name in finding.message
    assert "prefork" in finding.fix


def test_timed_task_in_the_plain_celery_form_on_eventlet_is_an_error() -> None:
    app = Celery("t")
    app.conf.update(worker_pool="eventlet")
    tq = celery_tq.install(app, preset="development")

    @app.task(base=TqTask, tq_timeout=5)
    def refund(order_id: int) -> None:
        return None

    assert "pool-cannot-enforce-timeouts" in codes(tq.check(), "error")


def test_gevent_pool_without_timed_tasks_is_fine() -> None:
    app = Celery("t")
    app.conf.update(worker_pool="gevent")
    tq = celery_tq.install(app, preset="development")

    @tq.task
    def charge(order_id: int) -> None:
        return None

    app.finalize()
    for name in list(app.tasks):  # shared tasks other tests of this process defined (timed ones)
        if name != charge.name and not name.startswith("celery."):
            app.tasks.unregister(name)
    assert codes(tq.check(), "error") == set()


def test_timed_task_on_the_threads_pool_is_only_information() -> None:
    app = Celery("t")
    app.conf.update(worker_pool="threads")
    tq = celery_tq.install(app, preset="development")

    @tq.task(timeout=30)
    def charge(order_id: int) -> None:
        return None

    findings = tq.check()
    assert codes(findings, "error") == set()
    assert "timeouts-enforced-by-tq" in codes(findings, "info")


def test_missing_result_backend_is_a_warning() -> None:
    findings = check("development", result_backend=None)
    assert "no-result-backend" in codes(findings, "warning")


def test_findings_come_most_severe_first() -> None:
    findings = check(accept_content=["pickle"], tq_allow_pickle=True, worker_prefetch_multiplier=4)
    levels = [f.level for f in findings]
    assert levels == sorted(levels, key=["error", "warning", "info"].index)
    assert levels[0] == "error"


def test_every_finding_has_a_level_code_message_and_fix() -> None:
    findings = check(
        accept_content=["pickle"],
        tq_allow_pickle=True,
        worker_prefetch_multiplier=4,
        broker=REDIS_URL,
        broker_transport_options={"priority_steps": [0, 3, 6, 9]},
    )
    assert len(findings) == 3
    for finding in findings:
        assert finding.level in {"error", "warning", "info"}
        assert finding.code and finding.message and finding.fix
        assert set(finding.as_dict()) == {"level", "code", "message", "fix"}


# --- celery -A mod tq check -----------------------------------------------------------------------


def run_check(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Write an app module to ``tmp_path`` and run ``celery -A it tq check --json`` on it."""
    (tmp_path / "tq_check_app.py").write_text(
        "from celery import Celery\nimport celery_tq\n\n" + textwrap.dedent(body)
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "TQ_DATA_DIR": str(tmp_path),
    }
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tq_check_app", "tq", "check", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def parsed(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    findings = json.loads(result.stdout)
    assert isinstance(findings, list)
    for finding in findings:
        assert set(finding) == {"level", "code", "message", "fix"}
    return findings


def test_cli_check_exits_one_when_pickle_is_accepted(tmp_path: Path) -> None:
    result = run_check(
        tmp_path,
        """
        app = Celery("shop")
        app.conf.update(accept_content=["json", "pickle"], tq_allow_pickle=True)
        tq = celery_tq.install(app, preset="development")
        """,
    )
    assert result.returncode == 1, result.stderr
    findings = parsed(result)
    assert {"level": "error", "code": "pickle-accepted"}.items() <= findings[0].items()


def test_cli_check_exits_zero_on_the_development_preset(tmp_path: Path) -> None:
    result = run_check(
        tmp_path,
        """
        app = Celery("shop")
        tq = celery_tq.install(app, preset="development")

        @tq.task(priority=7, timeout=30, tags={"billing"})
        def charge(order_id):
            return order_id
        """,
    )
    assert result.returncode == 0, result.stderr
    assert parsed(result) == []


def test_cli_check_exits_zero_when_there_are_only_warnings(tmp_path: Path) -> None:
    result = run_check(
        tmp_path,
        """
        app = Celery("shop")
        tq = celery_tq.install(app, preset="testing")
        """,
    )
    assert result.returncode == 0, result.stderr
    findings = parsed(result)
    assert [(f["level"], f["code"]) for f in findings] == [("warning", "priority-ignored")]


@pytest.mark.parametrize("backend", [None, "redis://127.0.0.1:6379/1"])
def test_a_registry_with_no_store_of_its_own_is_a_warning(backend: str | None) -> None:
    findings = check("production", broker=AMQP_URL, result_backend=backend)
    registry = [f for f in findings if f.code == "registry-in-memory"]
    assert len(registry) == 1 and registry[0].level == "warning"
    assert "tq_registry_url" in registry[0].fix


def test_a_registry_url_or_a_tq_backend_gives_no_registry_warning() -> None:
    assert "registry-in-memory" not in codes(
        check("production", broker=AMQP_URL, result_backend=None, tq_registry_url="redis://127.0.0.1/1")
    )
    assert "registry-in-memory" not in codes(check("testing"))  # everything in one process


def test_worker_refuses_to_start_with_pickle_accepted(tmp_path: Path) -> None:
    (tmp_path / "tq_pickle_app.py").write_text(
        "from celery import Celery\nimport celery_tq\n\n"
        'app = Celery("shop", broker="memory://")\n'
        'app.conf.update(accept_content=["json", "pickle"])\n'
        'celery_tq.install(app, preset="testing")\n'
    )
    # C_FORCE_ROOT: Celery itself refuses pickle to a root worker; this is about everyone else.
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TQ_DATA_DIR": str(tmp_path), "C_FORCE_ROOT": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tq_pickle_app", "worker", "-P", "solo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "accept_content allow pickle" in result.stderr + result.stdout
    assert " ready." not in result.stderr + result.stdout
