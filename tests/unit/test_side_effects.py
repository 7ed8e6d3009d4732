"""Importing celery_tq changes nothing; an installed app is freed once its owner drops it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(code: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


STATE = """
import atexit, json, threading
from celery import signals
from kombu.transport import TRANSPORT_ALIASES

def state():
    receivers = {
        name: len(getattr(signals, name).receivers or ())
        for name in dir(signals)
        if hasattr(getattr(signals, name), "receivers")
    }
    return {
        "atexit": atexit._ncallbacks(),
        "threads": threading.active_count(),
        "receivers": receivers,
        "aliases": sorted(TRANSPORT_ALIASES),
    }
"""


def test_importing_celery_tq_adds_no_atexit_handler_thread_receiver_or_transport_alias() -> None:
    result = _run(
        STATE
        + """
before = state()
import celery_tq, celery_tq.cli, celery_tq.backend, celery_tq.registry.writer, celery_tq.transport
print(json.dumps({"before": before, "after": state()}))
"""
    )
    assert result["before"] == result["after"]


def test_an_installed_app_is_garbage_collected_once_dropped() -> None:
    result = _run(
        """
import gc, json, weakref
from celery import Celery
import celery_tq

app = Celery("dropped", set_as_current=False)  # Celery's current app would keep it alive
celery_tq.install(app, preset="testing")
app.conf.update(broker_url="memory://", result_backend="tq+memory://")

@app.task(name="dropped.add", shared=False)
def add(x, y):
    return x + y

app.finalize()
ref = weakref.ref(app)
del app, add
gc.collect()
print(json.dumps({"alive": ref() is not None}))
"""
    )
    assert result == {"alive": False}
