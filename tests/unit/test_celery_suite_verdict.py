"""``make compat``'s verdict (scripts/celery_suite.py) without running Celery's suite: a run that
did not reach its end, or a test one configuration never reported, fails it like a new failure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "celery_suite.py"


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("celery_suite_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def outcome(suite: ModuleType, exit_code: int | None, passed: set[str], failed: set[str] = set()) -> object:  # noqa: B006
    return suite.Outcome(passed=set(passed), failed=set(failed), exit_code=exit_code)


def test_complete_runs_with_only_plain_celerys_failures_pass(suite: ModuleType) -> None:
    plain = outcome(suite, 1, {"a", "b"}, {"c"})
    installed = outcome(suite, 1, {"a", "b"}, {"c"})
    assert suite.report({"plain": plain, "installed": installed}, {}, ["f.py"]) == 0


def test_a_new_failure_fails_and_a_documented_difference_does_not(suite: ModuleType) -> None:
    plain = outcome(suite, 0, {"a", "b"})
    installed = outcome(suite, 1, {"a"}, {"b"})
    assert suite.report({"plain": plain, "installed": installed}, {}, ["f.py"]) == 1
    assert suite.report({"plain": plain, "installed": installed}, {"b": "why"}, ["f.py"]) == 0


@pytest.mark.parametrize(
    "exit_code", [None, -9, 2, 3, 5], ids=["no exit", "killed", "interrupted", "crash", "none"]
)
def test_a_run_that_did_not_reach_its_end_fails(
    suite: ModuleType, exit_code: int | None, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = outcome(suite, 0, {"a", "b"})
    cut = outcome(suite, exit_code, {"a"})  # what the junit file held when it stopped
    assert suite.report({"plain": plain, "installed": cut}, {}, ["f.py"]) == 1
    assert "INCOMPLETE RUN [installed]" in capsys.readouterr().out
    assert suite.report({"plain": cut, "installed": plain}, {}, ["f.py"]) == 1  # plain's too


def test_a_run_with_nothing_passed_fails(suite: ModuleType) -> None:
    empty = outcome(suite, 0, set())
    assert suite.report({"plain": empty, "installed": empty}, {}, ["f.py"]) == 1


def test_a_test_plain_celery_ran_and_a_configuration_never_reported_fails(
    suite: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = outcome(suite, 0, {"a", "b"})
    installed = outcome(suite, 0, {"a"})
    assert suite.report({"plain": plain, "installed": installed}, {}, ["f.py"]) == 1
    assert "NOT RUN [installed] b" in capsys.readouterr().out
