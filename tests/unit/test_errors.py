"""The error tree of celery_tq.errors: fields, retryability, rebuilding, and context lines."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

import celery_tq
from celery_tq import errors
from celery_tq.errors import (
    Cancelled,
    ConfigurationError,
    ExecutionFailed,
    InvalidInput,
    IoError,
    MetadataError,
    ResourceUnavailable,
    StorageError,
    TaskError,
    TaskTimeout,
    WorkerLost,
    context_of,
)

# Each error class, the arguments a user would build it with, and the fields they become.
CASES: list[tuple[type[TaskError], tuple[Any, ...], dict[str, Any]]] = [
    (
        ExecutionFailed,
        ("shop.charge", "KeyError: 'sku'"),
        {"task_name": "shop.charge", "error": "KeyError: 'sku'"},
    ),
    (TaskTimeout, ("shop.charge", 30.0), {"task_name": "shop.charge", "duration": 30.0}),
    (ResourceUnavailable, ("postgres://db:5432",), {"resource": "postgres://db:5432"}),
    (IoError, ("read", "/var/invoices/5.pdf"), {"operation": "read", "path": "/var/invoices/5.pdf"}),
    (InvalidInput, ("order_id must be positive",), {"message": "order_id must be positive"}),
    (
        WorkerLost,
        ("shop.charge", "signal 9 (SIGKILL)"),
        {"task_name": "shop.charge", "detail": "signal 9 (SIGKILL)"},
    ),
    (Cancelled, ("shop.charge",), {"task_name": "shop.charge"}),
    (
        StorageError,
        ("cannot write record", "abc-123"),
        {"message": "cannot write record", "record_id": "abc-123"},
    ),
    (ConfigurationError, ("tq_timeout_grace must be >= 0",), {"message": "tq_timeout_grace must be >= 0"}),
    (MetadataError, ("priority must be in 0..9",), {"message": "priority must be in 0..9"}),
]
IDS = [case[0].__name__ for case in CASES]


def fields_of(exc: BaseException, names: Any) -> dict[str, Any]:
    return {name: getattr(exc, name) for name in names}


def test_every_public_error_class_is_covered_here() -> None:
    public = {
        name
        for name in errors.__all__
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), BaseException)
    }
    assert public == {cls.__name__ for cls, _, _ in CASES} | {"TaskError"}


@pytest.mark.parametrize(("cls", "args", "fields"), CASES, ids=IDS)
def test_error_derives_from_task_error(
    cls: type[TaskError], args: tuple[Any, ...], fields: dict[str, Any]
) -> None:
    assert issubclass(cls, TaskError)
    assert isinstance(cls(*args), Exception)


@pytest.mark.parametrize(("cls", "args", "fields"), CASES, ids=IDS)
def test_error_fields_are_attributes(
    cls: type[TaskError], args: tuple[Any, ...], fields: dict[str, Any]
) -> None:
    assert fields_of(cls(*args), fields) == fields


@pytest.mark.parametrize(("cls", "args", "fields"), CASES, ids=IDS)
def test_error_keeps_its_fields_in_args(
    cls: type[TaskError], args: tuple[Any, ...], fields: dict[str, Any]
) -> None:
    assert cls(*args).args == args


@pytest.mark.parametrize(("cls", "args", "fields"), CASES, ids=IDS)
def test_only_resource_unavailable_is_retryable(
    cls: type[TaskError], args: tuple[Any, ...], fields: dict[str, Any]
) -> None:
    assert cls(*args).retryable is (cls is ResourceUnavailable)


def test_task_error_root_is_not_retryable() -> None:
    assert TaskError("x").retryable is False


@pytest.mark.parametrize(("cls", "args", "fields"), CASES, ids=IDS)
def test_error_text_names_its_fields(
    cls: type[TaskError], args: tuple[Any, ...], fields: dict[str, Any]
) -> None:
    text = str(cls(*args))
    for value in fields.values():
        assert (f"{value:g}" if isinstance(value, float) else value) in text
    assert not text.startswith("(")


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ExecutionFailed("shop.charge", "KeyError: 'sku'"), "task shop.charge failed: KeyError: 'sku'"),
        (TaskTimeout("shop.charge", 30.0), "task shop.charge exceeded its timeout of 30s"),
        (TaskTimeout("shop.charge", 2.5), "task shop.charge exceeded its timeout of 2.5s"),
        (ResourceUnavailable("redis"), "resource unavailable: redis"),
        (IoError("read", "/tmp/x"), "I/O error: read (/tmp/x)"),
        (IoError("read"), "I/O error: read"),
        (InvalidInput("order_id must be positive"), "order_id must be positive"),
        (WorkerLost("shop.charge", "signal 9"), "worker running shop.charge was lost: signal 9"),
        (WorkerLost("shop.charge"), "worker running shop.charge was lost"),
        (Cancelled("shop.charge"), "task shop.charge was cancelled"),
        (StorageError("cannot write", "r1"), "cannot write (record r1)"),
        (StorageError("cannot write"), "cannot write"),
        (ConfigurationError("bad setting"), "bad setting"),
        (MetadataError("bad priority"), "bad priority"),
    ],
)
def test_error_reads_as_a_sentence(error: TaskError, text: str) -> None:
    assert str(error) == text


@pytest.mark.parametrize(("cls", "args", "fields"), CASES, ids=IDS)
def test_error_is_rebuilt_from_its_own_args(
    cls: type[TaskError], args: tuple[Any, ...], fields: dict[str, Any]
) -> None:
    original = cls(*args)
    rebuilt = cls(*original.args)
    assert type(rebuilt) is cls
    assert fields_of(rebuilt, fields) == fields
    assert str(rebuilt) == str(original)


@pytest.mark.parametrize(("cls", "args", "fields"), CASES, ids=IDS)
def test_error_survives_pickle(cls: type[TaskError], args: tuple[Any, ...], fields: dict[str, Any]) -> None:
    rebuilt = pickle.loads(pickle.dumps(cls(*args)))
    assert type(rebuilt) is cls
    assert fields_of(rebuilt, fields) == fields
    assert rebuilt.args == args


def test_error_context_survives_pickle() -> None:
    with pytest.raises(ResourceUnavailable) as info, celery_tq.context("loading invoice %s", 5):
        raise ResourceUnavailable("postgres")
    rebuilt = pickle.loads(pickle.dumps(info.value))
    assert rebuilt.context == ["loading invoice 5"]


def test_optional_fields_default_to_empty() -> None:
    assert IoError("read").path == ""
    assert WorkerLost("shop.charge").detail == ""
    assert StorageError("cannot write").record_id == ""


def test_execution_failed_takes_context_lines_without_putting_them_in_args() -> None:
    error = ExecutionFailed("shop.charge", "boom", ["loading invoice 5", "charging order 7"])
    assert error.context == ["loading invoice 5", "charging order 7"]
    assert error.args == ("shop.charge", "boom")


def test_invalid_input_and_metadata_error_are_caught_as_value_error() -> None:
    assert isinstance(InvalidInput("x"), ValueError)
    assert isinstance(MetadataError("x"), ValueError)


def test_error_without_context_has_an_empty_context_list() -> None:
    assert ResourceUnavailable("redis").context == []


def test_remote_traceback_is_none_until_the_error_crosses_the_wire() -> None:
    assert ResourceUnavailable("redis").remote_traceback is None


# --- context() ------------------------------------------------------------------------------------


def test_context_adds_a_formatted_line_to_an_escaping_error() -> None:
    with pytest.raises(ResourceUnavailable) as info, celery_tq.context("loading invoice %s", 5):
        raise ResourceUnavailable("postgres")
    assert info.value.context == ["loading invoice 5"]


def test_context_is_also_reachable_as_celery_tq_errors_context() -> None:
    assert celery_tq.context is errors.context


def test_nested_contexts_list_the_innermost_line_first() -> None:
    def load(n: int) -> None:
        with celery_tq.context("reading page %s", n):
            raise IoError("read", f"/invoices/{n}.pdf")

    with (
        pytest.raises(IoError) as info,
        celery_tq.context("charging order %s", 7),
        celery_tq.context("loading invoice %s", 5),
    ):
        load(2)
    assert info.value.context == ["reading page 2", "loading invoice 5", "charging order 7"]


def test_context_message_without_arguments_is_kept_as_written() -> None:
    with pytest.raises(TaskError) as info, celery_tq.context("100% sure this fails"):
        raise TaskError("x")
    assert info.value.context == ["100% sure this fails"]


def test_context_leaves_a_block_that_succeeds_alone() -> None:
    with celery_tq.context("loading invoice %s", 5):
        value = 1 + 1
    assert value == 2


def test_context_does_not_swallow_or_replace_the_error() -> None:
    original = KeyError("sku")
    with pytest.raises(KeyError) as info, celery_tq.context("loading invoice %s", 5):
        raise original
    assert info.value is original


def test_errors_not_derived_from_task_error_get_context_lines_too() -> None:
    with (
        pytest.raises(KeyError) as info,
        celery_tq.context("outer"),
        celery_tq.context("loading invoice %s", 5),
    ):
        raise KeyError("sku")
    assert context_of(info.value) == ["loading invoice 5", "outer"]


def test_context_lines_show_in_the_error_notes_for_worker_logs() -> None:
    with pytest.raises(ValueError) as info, celery_tq.context("loading invoice %s", 5):
        raise ValueError("bad")
    assert "context: loading invoice 5" in info.value.__notes__


def test_context_of_an_error_that_never_passed_a_context_is_empty() -> None:
    assert context_of(RuntimeError("x")) == []


def test_cancelled_is_also_celerys_task_revoked_error() -> None:
    from celery.exceptions import TaskRevokedError

    assert issubclass(Cancelled, TaskRevokedError)
    assert issubclass(Cancelled, TaskError)
