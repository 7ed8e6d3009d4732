"""Errors across the wire: convert what a task raised, encode it as JSON, rebuild it on the caller.

The encoded form (key ``tq`` beside Celery's own ``exc_type``/``exc_message``/``exc_module``, so
stock Celery clients still rebuild the class) keeps the type, the fields (``args``), context
lines, the ``__cause__`` chain and the traceback as text. Tracebacks are never kept live.

An exception whose class does not take its own ``args`` back (``CardExpired(order_id, month)``
calling ``super().__init__(message)``) can be rebuilt by no caller, and Celery would wrap it in its
``UnpickleableExceptionWrapper``: the worker turns it into ``ExecutionFailed`` with
``original_type``, and the encoded form folds the original in (its traceback, its cause).
"""

from __future__ import annotations

import builtins
import json
import sys
import traceback
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery.exceptions import TaskPredicate, TaskRevokedError
from celery.utils.serialization import UnpickleableExceptionWrapper
from kombu.exceptions import EncodeError

from celery_tq.errors import (
    Cancelled,
    ExecutionFailed,
    InvalidInput,
    IoError,
    ResourceUnavailable,
    TaskError,
    TaskTimeout,
    WorkerLost,
    add_context,
    context_of,
)

__all__ = ["convert", "decode", "encode"]

TASK_ATTR = "__tq_task__"
_MAX_CHAIN = 8
#: Causes rebuilt on the caller; a stored (possibly forged) chain is cut there.
MAX_DECODED_CHAIN = 32
_CONNECTION_ERROR_NAMES = {"ConnectionError", "OperationalError", "InterfaceError", "TimeoutError"}
_CONNECTION_ERROR_MODULES = ("redis", "kombu", "amqp", "psycopg", "sqlalchemy", "pymysql")


def convert(exc: BaseException, task_name: str, timeout: float | None) -> BaseException:
    """The error the caller should see for ``exc`` raised by (or around) ``task_name``."""
    if isinstance(exc, TaskError | TaskPredicate):  # ours already, or Celery's Retry/Ignore/Reject
        return exc
    converted: TaskError | None = None
    if isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded):
        limit = timeout if timeout is not None else _limit_of(exc)
        converted = TaskTimeout(task_name, limit)
    elif isinstance(exc, WorkerLostError):
        converted = WorkerLost(task_name, str(exc))
    elif isinstance(exc, TaskRevokedError):
        converted = Cancelled(task_name)
    elif isinstance(exc, EncodeError):  # e.g. a result that JSON cannot carry
        converted = InvalidInput(f"the result of {task_name or 'the task'} cannot be serialized: {exc}")
    elif _is_connection_error(exc):
        converted = ResourceUnavailable(_describe(exc))
    elif isinstance(exc, OSError):
        converted = IoError(exc.strerror or _describe(exc), str(exc.filename or ""))
    elif isinstance(exc, UnpickleableExceptionWrapper) or not _rebuilds(exc):
        converted = _execution_failed(exc, task_name)
    if converted is None:
        return exc
    converted.__cause__ = exc
    for line in context_of(exc):
        add_context(converted, line)
    return converted


def encode(exc: BaseException, depth: int = 0) -> dict[str, Any]:
    """A JSON-safe description of ``exc`` and its cause chain."""
    cls = type(exc)
    original = _folded_original(exc)
    data: dict[str, Any] = {
        "type": cls.__qualname__,
        "module": cls.__module__,
        "args": _json_safe(list(exc.args)),
        "message": _describe(exc),
        "retryable": bool(getattr(exc, "retryable", False)),
        "context": list(context_of(exc)),
        "traceback": _traceback_text(exc),
        "cause": None,
        "task": exc.__dict__.get(TASK_ATTR),
        "attrs": _attributes(exc),
    }
    if isinstance(exc, ExecutionFailed) and getattr(exc, "original_type", None):
        data["original_type"] = str(exc.original_type)  # type: ignore[attr-defined]
    if original is not None:  # the original's own frames, and what caused it
        data["traceback"] = _original_traceback(original, data["original_type"]) or data["traceback"]
        exc = original
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None and depth < _MAX_CHAIN:
        data["cause"] = encode(cause, depth + 1)
    return data


def decode(data: dict[str, Any], task_name: str = "") -> Exception:
    """Rebuild an exception encoded by :func:`encode` (never imports modules, never runs code).

    Anyone who can write the result store can write this payload: only ``Exception`` subclasses
    are rebuilt (never ``SystemExit``/``KeyboardInterrupt``), and the cause chain stops after
    ``MAX_DECODED_CHAIN`` levels.
    """
    task_name = task_name or str(data.get("task") or "")
    first: Exception | None = None
    previous: Exception | None = None
    level: Any = data
    for _ in range(MAX_DECODED_CHAIN + 1):
        if not isinstance(level, dict):
            break
        exc = _rebuild(level, task_name)
        lines = level.get("context")
        context_of(exc)[:] = [str(line) for line in lines] if isinstance(lines, list) else []
        if type(exc).__qualname__ == level.get("type"):  # not onto an ExecutionFailed stand-in
            _restore_attributes(exc, level.get("attrs"))
        text = level.get("traceback")
        exc.remote_traceback = text if isinstance(text, str) else None  # type: ignore[attr-defined]
        if previous is None:
            first = exc
        else:
            previous.__cause__ = exc
        previous = exc
        level = level.get("cause")
    assert first is not None
    return first


def _rebuild(data: dict[str, Any], task_name: str) -> Exception:
    cls = _lookup(str(data.get("module", "")), str(data.get("type", "")))
    args = data.get("args")
    args = args if isinstance(args, list) else []
    if cls is not None:
        try:
            exc = cls(*args)
        except Exception:  # the class exists but does not take its own args back
            pass
        else:
            if isinstance(exc, ExecutionFailed) and data.get("original_type"):
                exc.original_type = str(data["original_type"])  # type: ignore[attr-defined]
            return exc
    original_type = f"{data.get('module')}.{data.get('type')}"
    message = str(data.get("message") or "")
    prefix = f"{data.get('type')}: "
    text = message[len(prefix) :] if message.startswith(prefix) else message
    failed = ExecutionFailed(task_name or "?", f"{original_type}: {text}")
    failed.original_type = original_type  # type: ignore[attr-defined]
    return failed


def _rebuilds(exc: BaseException) -> bool:
    """Whether ``type(exc)(*exc.args)`` gives the same exception back (what any caller does)."""
    try:
        clone = type(exc)(*exc.args)
    except Exception:
        return False
    return type(clone) is type(exc) and clone.args == exc.args


def _execution_failed(exc: BaseException, task_name: str) -> ExecutionFailed:
    if isinstance(exc, UnpickleableExceptionWrapper):  # Celery's stand-in: name what it wraps
        original_type = f"{exc.exc_module}.{exc.exc_cls_name}"
        text = str(getattr(exc, "text", "") or "")
        error = f"{exc.exc_cls_name}: {text}" if text else str(exc.exc_cls_name)
    else:
        original_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
        error = _describe(exc)
    failed = ExecutionFailed(task_name or "?", error)
    failed.original_type = original_type  # type: ignore[attr-defined]
    return failed


def _folded_original(exc: BaseException) -> BaseException | None:
    """The exception an ``ExecutionFailed`` of :func:`convert` stands for (its direct cause)."""
    original_type = getattr(exc, "original_type", None)
    cause = exc.__cause__
    if not isinstance(exc, ExecutionFailed) or not original_type or cause is None:
        return None
    if isinstance(cause, UnpickleableExceptionWrapper):
        return cause if f"{cause.exc_module}.{cause.exc_cls_name}" == original_type else None
    return cause if f"{type(cause).__module__}.{type(cause).__qualname__}" == original_type else None


def _original_traceback(original: BaseException, original_type: str) -> str | None:
    """The original's traceback, ending with its own type (never Celery's wrapper)."""
    if original.__traceback__ is None:
        return None
    text = (
        str(getattr(original, "text", "") or "")
        if isinstance(original, UnpickleableExceptionWrapper)
        else str(original)
    )
    frames = "".join(traceback.format_tb(original.__traceback__))
    last = f"{original_type}: {text}" if text else original_type
    return f"Traceback (most recent call last):\n{frames}{last}\n"


def _lookup(module: str, qualname: str) -> type[Exception] | None:
    """An already imported ``Exception`` class (``SystemExit`` and friends never come back)."""
    owner: Any = builtins if module == "builtins" else sys.modules.get(module)
    for part in qualname.split("."):
        owner = getattr(owner, part, None)
    if isinstance(owner, type) and issubclass(owner, Exception):
        return owner
    return None


_NOT_ATTRIBUTES = {"remote_traceback", "args"}


def _attributes(exc: BaseException) -> dict[str, Any]:
    """The instance attributes JSON can carry (``exc.code = 402``); private and live ones stay."""
    kept: dict[str, Any] = {}
    for name, value in vars(exc).items():
        if name.startswith("_") or name in _NOT_ATTRIBUTES:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        kept[name] = value
    return kept


def _restore_attributes(exc: Exception, attrs: object) -> None:
    """Set the carried attributes as plain instance data (no setters or descriptors run)."""
    if not isinstance(attrs, dict):
        return
    for name, value in attrs.items():
        if (
            isinstance(name, str)
            and name.isidentifier()
            and not name.startswith("_")
            and name not in _NOT_ATTRIBUTES
        ):
            vars(exc)[name] = value


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    module = type(exc).__module__.split(".", 1)[0]
    return module in _CONNECTION_ERROR_MODULES and any(
        c.__name__ in _CONNECTION_ERROR_NAMES for c in type(exc).__mro__
    )


def _limit_of(exc: BaseException) -> float:
    try:
        return float(exc.args[0])
    except (IndexError, TypeError, ValueError):
        return 0.0


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _traceback_text(exc: BaseException) -> str | None:
    remote = getattr(exc, "remote_traceback", None)
    if exc.__traceback__ is None:
        return remote if isinstance(remote, str) else None
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, chain=False))


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return [repr(v) for v in value] if isinstance(value, list) else repr(value)
