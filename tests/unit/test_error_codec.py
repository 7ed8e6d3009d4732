"""Errors across the wire: convert, encode/decode through JSON, and result backends that carry them."""

from __future__ import annotations

import json
import os
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery import Celery
from celery.app.task import Context
from celery.exceptions import TaskRevokedError
from celery.result import AsyncResult

import celery_tq
from celery_tq import error_codec
from celery_tq.errors import (
    Cancelled,
    ExecutionFailed,
    InvalidInput,
    IoError,
    ResourceUnavailable,
    StorageError,
    TaskError,
    TaskTimeout,
    WorkerLost,
    context_of,
)
from celery_tq.result_errors import StructuredErrorsMixin, with_structured_errors


class CustomError(Exception):
    """A user's own exception class, importable on both sides."""


class Outer:
    class NestedError(Exception):
        """A user's exception class nested in another class."""


class PickyError(Exception):
    """Its __init__ does not take its own args back."""

    def __init__(self, sku: str, quantity: int) -> None:
        super().__init__(f"{quantity} x {sku}")


def raised(fn: Callable[[], Any]) -> BaseException:
    """The exception ``fn`` raises, with its traceback."""
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("expected an exception")


def thrown(exc: BaseException) -> BaseException:
    """``exc`` after it was raised, so it has a traceback."""
    try:
        raise exc
    except BaseException as caught:
        return caught


def over_json(exc: BaseException, task_name: str = "") -> BaseException:
    return error_codec.decode(json.loads(json.dumps(error_codec.encode(exc))), task_name)


# --- convert --------------------------------------------------------------------------------------


def test_os_error_becomes_io_error_with_the_path() -> None:
    original = OSError(5, "Input/output error", "/var/invoices/5.pdf")
    converted = error_codec.convert(original, "shop.charge", None)
    assert isinstance(converted, IoError)
    assert converted.path == "/var/invoices/5.pdf"
    assert converted.operation == "Input/output error"
    assert converted.__cause__ is original


def test_file_not_found_from_open_becomes_io_error_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    original = raised(lambda: missing.open())
    converted = error_codec.convert(original, "shop.charge", None)
    assert isinstance(converted, IoError)
    assert converted.path == str(missing)
    assert "No such file" in str(converted)


def test_os_error_without_a_filename_becomes_io_error_with_an_empty_path() -> None:
    converted = error_codec.convert(OSError("disk on fire"), "shop.charge", None)
    assert isinstance(converted, IoError)
    assert converted.path == ""
    assert "disk on fire" in converted.operation


@pytest.mark.parametrize(
    "original",
    [
        ConnectionError("connection reset"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        redis.exceptions.ConnectionError("Error 111 connecting to localhost:6379"),
    ],
    ids=["ConnectionError", "ConnectionRefusedError", "TimeoutError", "redis.ConnectionError"],
)
def test_connection_failures_become_retryable_resource_unavailable(original: BaseException) -> None:
    converted = error_codec.convert(original, "shop.charge", None)
    assert isinstance(converted, ResourceUnavailable)
    assert converted.retryable is True
    assert type(original).__name__ in converted.resource
    assert converted.__cause__ is original


def test_redis_timeout_becomes_resource_unavailable() -> None:
    converted = error_codec.convert(redis.exceptions.TimeoutError("Timeout reading from socket"), "t", None)
    assert isinstance(converted, ResourceUnavailable)


def test_soft_time_limit_becomes_task_timeout_with_the_declared_timeout() -> None:
    original = SoftTimeLimitExceeded()
    converted = error_codec.convert(original, "shop.charge", 30.0)
    assert isinstance(converted, TaskTimeout)
    assert converted.task_name == "shop.charge"
    assert converted.duration == 30.0
    assert converted.__cause__ is original


def test_hard_time_limit_becomes_task_timeout_with_the_limit_it_carries() -> None:
    converted = error_codec.convert(TimeLimitExceeded(31.0), "shop.charge", None)
    assert isinstance(converted, TaskTimeout)
    assert converted.duration == 31.0


def test_celery_time_limit_exceptions_are_billiard_ones() -> None:
    from celery.exceptions import SoftTimeLimitExceeded as CelerySoft

    assert isinstance(error_codec.convert(CelerySoft(), "shop.charge", 5.0), TaskTimeout)


def test_worker_lost_error_becomes_worker_lost() -> None:
    original = WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL)")
    converted = error_codec.convert(original, "shop.charge", None)
    assert isinstance(converted, WorkerLost)
    assert converted.task_name == "shop.charge"
    assert "SIGKILL" in converted.detail
    assert converted.__cause__ is original


def test_revoked_task_becomes_cancelled() -> None:
    converted = error_codec.convert(TaskRevokedError("revoked"), "shop.charge", None)
    assert isinstance(converted, Cancelled)
    assert converted.task_name == "shop.charge"


@pytest.mark.parametrize(
    "original",
    [ResourceUnavailable("redis"), InvalidInput("bad"), TaskTimeout("t", 1.0), StorageError("x", "r")],
)
def test_task_errors_pass_through_unchanged(original: TaskError) -> None:
    assert error_codec.convert(original, "shop.charge", 10.0) is original


@pytest.mark.parametrize(
    "original", [ValueError("bad"), KeyError("sku"), CustomError("mine"), ZeroDivisionError()]
)
def test_other_exceptions_pass_through_unchanged(original: Exception) -> None:
    assert error_codec.convert(original, "shop.charge", None) is original


def test_converted_error_carries_the_context_lines_of_the_original() -> None:
    def load() -> None:
        with celery_tq.context("charging order %s", 7), celery_tq.context("loading invoice %s", 5):
            raise OSError(13, "Permission denied", "/var/invoices/5.pdf")

    converted = error_codec.convert(raised(load), "shop.charge", None)
    assert isinstance(converted, IoError)
    assert converted.context == ["loading invoice 5", "charging order 7"]


# --- encode / decode ------------------------------------------------------------------------------


def three_level_chain() -> BaseException:
    def read() -> None:
        raise OSError(5, "Input/output error", "/var/invoices/5.pdf")

    def load() -> None:
        try:
            read()
        except OSError as exc:
            raise IoError("read", "/var/invoices/5.pdf") from exc

    def save() -> None:
        with celery_tq.context("saving invoice %s", 5):
            try:
                with celery_tq.context("loading invoice %s", 5):
                    load()
            except IoError as exc:
                raise StorageError("cannot save invoice", "inv-5") from exc

    return raised(save)


def test_encoded_error_is_json() -> None:
    data = error_codec.encode(three_level_chain())
    assert json.loads(json.dumps(data)) == data


def test_decoded_error_has_the_same_class_fields_and_context() -> None:
    decoded = over_json(three_level_chain())
    assert type(decoded) is StorageError
    assert decoded.message == "cannot save invoice"
    assert decoded.record_id == "inv-5"
    assert context_of(decoded) == ["saving invoice 5"]


def test_decoded_error_keeps_a_three_level_cause_chain() -> None:
    decoded = over_json(three_level_chain())
    middle = decoded.__cause__
    assert type(middle) is IoError
    assert (middle.operation, middle.path) == ("read", "/var/invoices/5.pdf")
    assert context_of(middle) == ["loading invoice 5"]
    root = middle.__cause__
    assert type(root) is OSError
    assert root.errno == 5
    assert root.strerror == "Input/output error"
    assert root.__cause__ is None


def test_decoded_errors_carry_their_traceback_as_text_at_every_level() -> None:
    decoded = over_json(three_level_chain())
    levels = [decoded, decoded.__cause__, decoded.__cause__.__cause__]  # type: ignore[union-attr]
    functions = ["save", "load", "read"]
    for level, function in zip(levels, functions, strict=True):
        text = level.remote_traceback  # type: ignore[union-attr]
        assert isinstance(text, str)
        assert "Traceback (most recent call last)" in text
        assert f"in {function}" in text


def test_traceback_is_never_kept_as_a_live_object() -> None:
    decoded = over_json(three_level_chain())
    assert decoded.__traceback__ is None


def test_implicit_exception_context_is_kept_as_the_cause() -> None:
    def handler() -> None:
        try:
            raise KeyError("sku")
        except KeyError:
            raise InvalidInput("unknown product") from None

    def sloppy_handler() -> None:
        try:
            raise KeyError("sku")
        except KeyError:
            raise InvalidInput("unknown product")  # noqa: B904 - implicit chaining is the point

    assert over_json(raised(handler)).__cause__ is None
    cause = over_json(raised(sloppy_handler)).__cause__
    assert type(cause) is KeyError
    assert cause.args == ("sku",)


@pytest.mark.parametrize(
    "original",
    [
        ResourceUnavailable("postgres"),
        TaskTimeout("shop.charge", 2.5),
        ExecutionFailed("shop.charge", "boom"),
        WorkerLost("shop.charge", "signal 9"),
        ValueError("bad value"),
        KeyError("sku"),
        CustomError("mine", 3),
        Outer.NestedError("nested"),
    ],
    ids=lambda e: type(e).__qualname__,
)
def test_importable_exception_comes_back_as_its_own_class(original: BaseException) -> None:
    decoded = over_json(thrown(original))
    assert type(decoded) is type(original)
    assert decoded.args == original.args
    assert str(decoded) == str(original)


def test_retryable_flag_survives_the_round_trip() -> None:
    assert over_json(ResourceUnavailable("redis")).retryable is True  # type: ignore[attr-defined]
    assert over_json(InvalidInput("bad")).retryable is False  # type: ignore[attr-defined]


def test_exception_class_missing_on_the_caller_becomes_execution_failed_with_its_type_name() -> None:
    gone = type("GoneError", (Exception,), {"__module__": "vanished_plugin.errors"})
    decoded = over_json(thrown(gone("boom")), "shop.charge")
    assert type(decoded) is ExecutionFailed
    assert decoded.task_name == "shop.charge"
    assert "vanished_plugin.errors.GoneError" in decoded.error
    assert "boom" in decoded.error
    assert decoded.original_type == "vanished_plugin.errors.GoneError"  # type: ignore[attr-defined]
    assert isinstance(decoded.remote_traceback, str)


def test_exception_class_that_cannot_take_its_args_back_becomes_execution_failed() -> None:
    decoded = over_json(thrown(PickyError("sku-1", 3)))
    assert type(decoded) is ExecutionFailed
    assert decoded.original_type == f"{__name__}.PickyError"  # type: ignore[attr-defined]
    assert "3 x sku-1" in decoded.error


def card_expired() -> BaseException:
    def charge_card() -> None:
        with celery_tq.context("charging order %s", 5):
            try:
                raise KeyError("card-5")
            except KeyError as exc:
                raise PickyError("card-5", 3) from exc

    return raised(charge_card)


def test_worker_turns_a_class_that_cannot_take_its_args_back_into_execution_failed() -> None:
    converted = error_codec.convert(card_expired(), "shop.charge", None)
    assert type(converted) is ExecutionFailed
    assert converted.original_type == f"{__name__}.PickyError"  # type: ignore[attr-defined]
    assert converted.error == "PickyError: 3 x card-5"
    assert converted.context == ["charging order 5"]


def test_execution_failed_for_an_unrebuildable_class_keeps_original_type_traceback_and_cause() -> None:
    original = card_expired()
    failed = error_codec.convert(original, "shop.charge", None)
    try:  # as TqTask raises it: from the original
        raise failed from original
    except ExecutionFailed as exc:
        decoded = over_json(exc, "shop.charge")
    assert type(decoded) is ExecutionFailed
    assert decoded.original_type == f"{__name__}.PickyError"  # type: ignore[attr-defined]
    assert decoded.context == ["charging order 5"]
    assert decoded.remote_traceback is not None
    assert "charge_card" in decoded.remote_traceback  # the user's own frame
    assert decoded.remote_traceback.rstrip().endswith(f"{__name__}.PickyError: 3 x card-5")
    assert type(decoded.__cause__) is KeyError  # the original's cause, not the original again


def test_celerys_unpickleable_wrapper_becomes_execution_failed_naming_the_wrapped_class() -> None:
    from celery.utils.serialization import UnpickleableExceptionWrapper, get_pickleable_exception

    wrapped = get_pickleable_exception(card_expired())  # what Celery's tracer stores for a plain task
    assert isinstance(wrapped, UnpickleableExceptionWrapper)
    converted = error_codec.convert(wrapped, "shop.charge", None)
    converted.__cause__ = wrapped
    data = error_codec.encode(converted)
    assert "Unpickleable" not in json.dumps(data)
    decoded = error_codec.decode(json.loads(json.dumps(data)), "shop.charge")
    assert type(decoded) is ExecutionFailed
    assert decoded.original_type == f"{__name__}.PickyError"  # type: ignore[attr-defined]
    assert decoded.remote_traceback is not None and "charge_card" in decoded.remote_traceback


def test_encoded_message_names_the_type_once() -> None:
    data = error_codec.encode(error_codec.convert(card_expired(), "shop.charge", None))
    assert data["message"] == "ExecutionFailed: task shop.charge failed: PickyError: 3 x card-5"
    gone = type("GoneError", (Exception,), {"__module__": "vanished_plugin.errors"})
    decoded = over_json(thrown(gone("boom")), "shop.charge")
    assert decoded.error == "vanished_plugin.errors.GoneError: boom"  # type: ignore[attr-defined]


def test_celerys_retry_is_never_converted() -> None:
    from celery.exceptions import Retry

    retry = Retry("again", ValueError("x"), 5)
    assert error_codec.convert(retry, "shop.charge", None) is retry


def test_decoding_a_payload_naming_os_system_never_calls_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    payload = {"type": "system", "module": "os", "args": ["echo pwned"], "message": "x"}
    decoded = error_codec.decode(json.loads(json.dumps(payload)))
    assert calls == []
    assert type(decoded) is ExecutionFailed
    assert decoded.original_type == "os.system"  # type: ignore[attr-defined]


def test_decoding_a_payload_naming_a_class_that_is_not_an_exception_never_builds_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"type": "Popen", "module": "subprocess", "args": [["touch", str(marker)]], "message": "x"}
    decoded = error_codec.decode(payload)
    assert not marker.exists()
    assert type(decoded) is ExecutionFailed


def test_decoding_never_imports_a_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "tq_never_imported.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Error(Exception):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    decoded = error_codec.decode({"type": "Error", "module": "tq_never_imported", "args": []})
    assert not marker.exists()
    assert type(decoded) is ExecutionFailed


def test_repeated_context_lines_survive_the_round_trip() -> None:
    def step(n: int) -> None:
        with celery_tq.context("retrying step"):
            if n == 0:
                raise InvalidInput("bad")
            step(n - 1)

    original = raised(lambda: step(1))
    assert context_of(original) == ["retrying step", "retrying step"]
    assert context_of(over_json(original)) == ["retrying step", "retrying step"]


# --- result backends ------------------------------------------------------------------------------


@pytest.fixture
def app() -> Celery:
    return Celery("t", broker="memory://", backend="cache+memory://")


def fail(app: Celery, exc: BaseException, task_name: str = "shop.charge") -> str:
    """Store ``exc`` as the failure of a new task id, the way a worker does."""
    task_id = str(uuid.uuid4())
    text = "".join(traceback.format_exception(exc))
    app.backend.mark_as_failure(task_id, exc, text, request=Context(id=task_id, task=task_name))
    return task_id


def outcome(app: Celery, task_id: str) -> BaseException:
    with pytest.raises(BaseException) as info:
        AsyncResult(task_id, app=app).get(timeout=5, propagate=True)
    return info.value


def test_structured_backend_gives_the_caller_the_same_class_fields_context_traceback_and_cause(
    app: Celery,
) -> None:
    def charge() -> None:
        with celery_tq.context("charging order %s", 7):
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except OSError as exc:
                raise ResourceUnavailable("postgres://db:5432") from exc

    with_structured_errors(app.backend)
    error = outcome(app, fail(app, raised(charge)))

    assert type(error) is ResourceUnavailable
    assert error.resource == "postgres://db:5432"
    assert error.retryable is True
    assert error.context == ["charging order 7"]
    assert isinstance(error.remote_traceback, str)
    assert "in charge" in error.remote_traceback
    assert type(error.__cause__) is ConnectionRefusedError
    assert error.__cause__.errno == 111


def test_structured_backend_stores_json_with_the_tq_envelope_beside_celerys_keys(app: Celery) -> None:
    backend = with_structured_errors(app.backend)
    task_id = fail(app, thrown(ResourceUnavailable("redis")))

    stored = json.loads(backend.get(backend.get_key_for_task(task_id)))
    result = stored["result"]
    assert result["exc_type"] == "ResourceUnavailable"
    assert result["exc_module"] == "celery_tq.errors"
    assert result["exc_message"] == ["redis"]
    assert result["tq"]["type"] == "ResourceUnavailable"
    assert result["tq"]["task"] == "shop.charge"


def test_structured_backend_converts_an_os_error_for_the_caller(app: Celery, tmp_path: Path) -> None:
    with_structured_errors(app.backend)
    missing = tmp_path / "invoice.pdf"
    error = outcome(app, fail(app, raised(lambda: missing.open())))
    assert type(error) is IoError
    assert error.path == str(missing)
    assert type(error.__cause__) is FileNotFoundError


def test_error_converted_by_the_backend_still_has_a_remote_traceback(app: Celery, tmp_path: Path) -> None:
    with_structured_errors(app.backend)

    def read_invoice() -> None:
        (tmp_path / "invoice.pdf").open()

    error = outcome(app, fail(app, raised(read_invoice)))
    assert isinstance(error.remote_traceback, str)  # type: ignore[attr-defined]
    assert "read_invoice" in error.remote_traceback  # type: ignore[attr-defined]


def test_structured_backend_names_the_task_when_the_class_is_missing_on_the_caller(app: Celery) -> None:
    with_structured_errors(app.backend)
    gone = type("GoneError", (Exception,), {"__module__": "vanished_plugin.errors"})
    error = outcome(app, fail(app, thrown(gone("boom")), "shop.refund"))
    assert type(error) is ExecutionFailed
    assert error.task_name == "shop.refund"
    assert error.original_type == "vanished_plugin.errors.GoneError"


def test_stock_backend_rebuilds_a_task_error_from_celerys_exc_message(app: Celery) -> None:
    assert not isinstance(app.backend, StructuredErrorsMixin)
    error = outcome(app, fail(app, thrown(TaskTimeout("shop.charge", 30.0))))
    assert type(error) is TaskTimeout
    assert (error.task_name, error.duration) == ("shop.charge", 30.0)


def test_stock_backend_reads_what_a_structured_backend_stored(app: Celery) -> None:
    writer = Celery("writer", broker="memory://", backend="cache+memory://")
    with_structured_errors(writer.backend)
    task_id = fail(writer, thrown(IoError("write", "/var/out.csv")))

    error = outcome(app, task_id)
    assert type(error) is IoError
    assert (error.operation, error.path) == ("write", "/var/out.csv")


def test_stock_backend_and_structured_backend_agree_on_the_stored_envelope(app: Celery) -> None:
    structured = with_structured_errors(Celery("w", backend="cache+memory://").backend)
    error = StorageError("cannot write", "r1")
    prepared = structured.prepare_exception(error)
    rebuilt = app.backend.exception_to_python(prepared)
    assert type(rebuilt) is StorageError
    assert (rebuilt.message, rebuilt.record_id) == ("cannot write", "r1")


def test_with_structured_errors_is_idempotent(app: Celery) -> None:
    backend = with_structured_errors(app.backend)
    cls = type(backend)
    assert with_structured_errors(backend) is backend
    assert type(backend) is cls
    assert isinstance(backend, StructuredErrorsMixin)


def test_installed_app_backend_carries_structured_errors() -> None:
    app = Celery("t")
    celery_tq.install(app, preset="testing")
    assert isinstance(app.backend, StructuredErrorsMixin)
    error = outcome(app, fail(app, thrown(ResourceUnavailable("redis"))))
    assert error.context == []
    assert isinstance(error.remote_traceback, str)


def test_unserializable_result_becomes_invalid_input() -> None:
    from kombu.exceptions import EncodeError

    original = EncodeError("Object of type object is not JSON serializable")
    converted = error_codec.convert(original, "shop.report", None)
    assert isinstance(converted, celery_tq.errors.InvalidInput)
    assert "shop.report" in converted.message and "cannot be serialized" in converted.message
    assert converted.__cause__ is original


# --- forged stored results (anyone who can write the store) ---------------------------------------


def forge(app: Celery, result: Any) -> str:
    """Write a FAILURE with ``result`` straight into the store, as an attacker could."""
    backend = with_structured_errors(app.backend)
    task_id = str(uuid.uuid4())
    meta = {"status": "FAILURE", "result": result, "traceback": None, "children": [], "task_id": task_id}
    backend.set(backend.get_key_for_task(task_id), json.dumps(meta))
    return task_id


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt", "GeneratorExit"])
def test_forged_envelope_never_rebuilds_a_process_stopping_exception(app: Celery, name: str) -> None:
    payload = {"type": name, "module": "builtins", "args": [0], "message": "x"}
    error = outcome(app, forge(app, {"exc_type": name, "exc_module": "builtins", "tq": payload}))
    assert type(error) is ExecutionFailed
    assert f"builtins.{name}" in error.error


@pytest.mark.parametrize("name", ["SystemExit", "KeyboardInterrupt"])
def test_forged_celery_format_never_rebuilds_a_process_stopping_exception(app: Celery, name: str) -> None:
    error = outcome(app, forge(app, {"exc_type": name, "exc_module": "builtins", "exc_message": [3]}))
    assert type(error) is ExecutionFailed
    assert f"builtins.{name}" in error.error


def _chain(depth: int) -> dict[str, Any]:
    payload: dict[str, Any] = {"type": "ValueError", "module": "builtins", "args": ["leaf"]}
    for i in range(depth - 1):
        payload = {"type": "ValueError", "module": "builtins", "args": [f"level {i}"], "cause": payload}
    return payload


def test_decoded_cause_chain_is_cut_at_thirty_two_levels() -> None:
    decoded: BaseException | None = error_codec.decode(_chain(900))
    depth = 0
    while decoded is not None:
        depth += 1
        decoded = decoded.__cause__
    assert depth == error_codec.MAX_DECODED_CHAIN + 1 == 33


def test_a_three_thousand_deep_stored_chain_is_a_storage_error_not_a_recursion_error(app: Celery) -> None:
    envelope = {"type": "ValueError", "module": "builtins", "args": ["x"], "cause": None}
    text = json.dumps({"exc_type": "ValueError", "exc_module": "builtins", "tq": envelope})
    nested = text.replace('"cause": null', '"cause": ' + '{"cause": ' * 3000 + "null" + "}" * 3000)
    task_id = forge(app, None)
    backend = app.backend
    key = backend.get_key_for_task(task_id)
    backend.set(key, backend.get(key).replace('"result": null', f'"result": {nested}'))
    with pytest.raises(StorageError, match="cannot be read: maximum recursion depth"):
        AsyncResult(task_id, app=app).get(timeout=5)


def test_forged_envelope_with_wrong_field_types_still_decodes() -> None:
    decoded = error_codec.decode({"type": "ValueError", "module": "builtins", "args": "x", "context": 5})
    assert type(decoded) is ValueError
    assert context_of(decoded) == []


class PaymentDeclined(Exception):
    """A user's exception carrying data in attributes, not in args."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = False


def test_json_instance_attributes_of_a_custom_exception_survive() -> None:
    original = PaymentDeclined("card declined")
    original.code = 402
    original.retryable = True
    original.details = {"card": "visa", "attempts": [1, 2]}
    original.handle = object()  # not JSON: dropped
    decoded = over_json(original)
    assert type(decoded) is PaymentDeclined
    assert decoded.code == 402  # type: ignore[attr-defined]
    assert decoded.retryable is True  # type: ignore[attr-defined]
    assert decoded.details == {"card": "visa", "attempts": [1, 2]}  # type: ignore[attr-defined]
    assert not hasattr(decoded, "handle")


def test_custom_exception_attributes_survive_the_structured_backend(app: Celery) -> None:
    with_structured_errors(app.backend)
    original = PaymentDeclined("card declined", code=402)
    error = outcome(app, fail(app, thrown(original)))
    assert type(error) is PaymentDeclined
    assert error.code == 402  # type: ignore[attr-defined]


def test_carried_attributes_never_land_on_a_stand_in_or_in_private_names() -> None:
    payload = {
        "type": "Missing",
        "module": "nowhere",
        "args": [],
        "attrs": {"error": "forged", "_private": 1, "__class__": "x"},
    }
    decoded = error_codec.decode(payload, "shop.charge")
    assert type(decoded) is ExecutionFailed
    assert decoded.error.startswith("nowhere.Missing")
    rebuilt = error_codec.decode(
        {"type": "ValueError", "module": "builtins", "args": [], "attrs": {"_x": 1, "__class__": 2}}
    )
    assert type(rebuilt) is ValueError and "_x" not in vars(rebuilt)
