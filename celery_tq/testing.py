"""Test helpers for celery-tq users: a real ``celery worker`` process, started and stopped cleanly.

::

    from celery_tq.testing import WorkerProcess

    def test_charge(tmp_path):
        with WorkerProcess("shop", pool="prefork", concurrency=2, env={"TQ_DATA_DIR": str(tmp_path)}):
            assert charge.delay(5).get(timeout=10) == {...}
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from celery_tq.errors import ConfigurationError

__all__ = ["WorkerProcess"]


class WorkerProcess:
    """``celery -A app worker`` as a subprocess; a context manager that waits until it is ready."""

    def __init__(
        self,
        app: str,
        *,
        pool: str = "prefork",
        concurrency: int = 1,
        queues: Iterable[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        hostname: str | None = None,
        extra_args: Iterable[str] = (),
        ready_timeout: float = 60.0,
        prefix: Iterable[str] = (),
    ) -> None:
        self.args = [
            *prefix,  # e.g. ["ip", "netns", "exec", "host1"]: a wrapper that execs the worker
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "-n",
            hostname or f"tq-{uuid.uuid4().hex[:8]}@%h",  # unique: two workers must not share a pidbox
            *(["-Q", ",".join(queues)] if queues else []),
            *extra_args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.cwd = str(cwd) if cwd else None
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tq-worker-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def log(self) -> str:
        """Everything the worker printed so far."""
        return Path(self._log.name).read_text(errors="replace")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> WorkerProcess:
        self.process = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if " ready." in self.log:
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        log = self.log
        self.stop()
        raise ConfigurationError(f"worker did not become ready: {' '.join(self.args)}\n{log[-3000:]}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """Warm shutdown: SIGTERM to the worker's main process, which lets its pool finish the
        tasks it runs; SIGKILL of the whole process group after ``timeout`` seconds."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            # not the group: a pool process dies of SIGTERM, and its task with it
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(10)
        self._signal(signal.SIGKILL)  # stray pool children
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """``kill -9`` the worker and its pool children at once."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def _signal(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)
