"""Configuration and stored data that celery-tq refuses or tames: pickle, Celery's time limits on
pools that ignore them, forged stored results, custom exception attributes, timeout messages."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from .harness import Outcome, Setup


def pickle_config(_setup: Setup | None = None) -> Outcome:
    """A user config accepting pickle: install(), a publish, and the documented opt-out."""
    from celery import Celery

    import celery_tq
    from celery_tq.errors import ConfigurationError

    def attempt(call: Callable[[], Any]) -> str:
        try:
            call()
        except ConfigurationError:
            return "ConfigurationError"
        return "accepted"

    def configured(**conf: Any) -> Celery:
        app = Celery("pickled", set_as_current=False)
        app.conf.update(**conf)
        assert app.conf.accept_content is not None  # the configuration is built
        return app

    pickled = {"accept_content": ["json", "pickle"]}
    at_install = attempt(lambda: celery_tq.install(configured(**pickled), preset="production"))
    late = Celery("pickled-late", set_as_current=False)
    tq = celery_tq.install(late, preset="testing")

    @tq.task(name="pickled.noop", shared=False)
    def noop() -> None: ...

    late.conf.update(**pickled)
    at_publish = attempt(noop.delay)
    opted_out = configured(**pickled, tq_allow_pickle=True)
    with_opt_out = attempt(lambda: celery_tq.install(opted_out, preset="production"))
    for app in (late, opted_out):
        app.close()
    return Outcome(
        "user config that accepts pickle",
        f"install(): {at_install}; set after install, first publish: {at_publish}; "
        f"with tq_allow_pickle = True: {with_opt_out}",
        "refused" if at_install == at_publish == "ConfigurationError" else "accepted",
        at_install == at_publish == "ConfigurationError" and with_opt_out == "accepted",
    )


def celery_time_limits(setup: Setup) -> Outcome:
    """Celery's soft_time_limit=1/time_limit=3 on threads and solo: a tq task sleeping 8 s, and a
    worker with a plain Celery task that has a limit."""
    from celery_tq.errors import ConfigurationError, TaskTimeout

    with setup.run("limits", start=False) as (app, _data, start_worker):
        seen: list[str] = []
        enforced = True
        for pool in ("threads", "solo"):
            worker = start_worker(pool=pool)
            started = time.monotonic()
            try:
                app.tasks["fault.celery_limited"].delay(8).get(timeout=30)
                seen.append(f"{pool}: SUCCESS after {time.monotonic() - started:.1f} s")
                enforced = False
            except TaskTimeout:
                elapsed = time.monotonic() - started
                seen.append(f"{pool}: TaskTimeout after {elapsed:.1f} s")
                enforced = enforced and elapsed < 7
            worker.stop()
        try:
            start_worker(pool="threads", env={"FAULTBENCH_PLAIN_LIMITED": "1"})
            refused = False
        except ConfigurationError as exc:
            refused = "cannot enforce Celery's soft_time_limit" in str(exc)
        seen.append(
            f"plain task on threads: {'ConfigurationError at start' if refused else 'worker started'}"
        )
        return Outcome(
            "Celery's soft_time_limit/time_limit on threads and solo",
            "; ".join(seen),
            "enforced (tq task) / refused at start (plain task)" if enforced and refused else "ignored",
            enforced and refused,
        )


def _forged_chain(depth: int) -> dict[str, Any]:
    level: dict[str, Any] | None = None
    for i in range(depth):
        level = {"type": "ValueError", "module": "builtins", "args": [f"level {i}"], "cause": level}
    assert level is not None
    return level


def forged_result(setup: Setup) -> Outcome:
    """Results written straight into the store by someone who can write it."""
    from celery.result import AsyncResult

    from celery_tq.registry import store_for_url
    from celery_tq.registry.record import change

    deep_meta = '{"exc_type": "ValueError", "exc_module": "builtins", "tq": ' + '{"cause": ' * 3000 + "null"
    forged = {
        "SystemExit": {"meta": json.dumps({"result": {"exc_type": "SystemExit", "exc_module": "builtins"}})},
        "SystemExit (tq)": {"meta": "{}", "error": json.dumps(_forged_chain(1) | {"type": "SystemExit"})},
        "3,000-deep cause chain": {"meta": '{"result": ' + deep_meta + "}" * 3001},
        "500-deep cause chain": {"meta": "{}", "error": json.dumps(_forged_chain(500))},
    }
    with setup.run("forged", start=False) as (app, _data, _start):
        store = store_for_url(setup.backend)
        seen: list[str] = []
        typed = True
        for label, fields in forged.items():
            task_id = str(uuid.uuid4())
            store.write([change(task_id, "FAILURE", name="forged", submitted_at=time.time(), **fields)])
            try:
                AsyncResult(task_id, app=app).get(timeout=10)
                seen.append(f"{label}: returned?")
                typed = False
            except Exception as exc:
                depth, cause = 0, exc.__cause__
                while cause is not None:
                    depth, cause = depth + 1, cause.__cause__
                seen.append(f"{label}: {type(exc).__name__}" + (f", {depth} causes" if depth > 1 else ""))
                typed = typed and depth <= 32
            except BaseException as exc:  # what must never happen: it escapes except Exception
                seen.append(f"{label}: {type(exc).__name__} ESCAPED")
                typed = False
        return Outcome(
            "forged stored result",
            "; ".join(seen),
            "get() raises an Exception, chain capped at 32" if typed else "escapes or unbounded",
            typed,
        )


def custom_attributes(setup: Setup) -> Outcome:
    """A user's exception with an attribute (``exc.code = 402``) raised in a worker."""
    with setup.run("attrs") as (app, _data, _start):
        try:
            app.tasks["fault.declined"].delay(402).get(timeout=30)
            seen, code = "returned?", None
        except Exception as exc:
            seen, code = f"{type(exc).__module__}.{type(exc).__name__}", getattr(exc, "code", None)
        return Outcome(
            "custom exception with attributes (code=402)",
            f"get() raised {seen} with code={code}",
            "attributes survive" if code == 402 else "attributes lost",
            seen == "faultbench_app.Declined" and code == 402,
        )


def prefork_timeout_message(setup: Setup) -> Outcome:
    """A tq task with Celery's soft_time_limit=1 (no tq timeout) past its limit on prefork."""
    from celery_tq.errors import TaskTimeout

    with setup.run("prefork-limit") as (app, _data, _start):
        try:
            app.tasks["fault.celery_limited"].delay(8).get(timeout=30)
            message, duration = "returned?", None
        except TaskTimeout as exc:
            message, duration = str(exc), exc.duration
        return Outcome(
            "prefork timeout message",
            f"TaskTimeout.duration = {duration}",
            f'"{message}"',
            duration == 1 and "timeout of 1s" in message,
        )
