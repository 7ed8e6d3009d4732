"""Every extra works alone: a clean virtualenv per extra, celery-tq with only that extra, and one
task end to end on that extra's broker or store (``tests/extras/extra_probe.py``).

Runs in CI (``TQ_REQUIRE_SERVICES=1``) or with ``TQ_TEST_EXTRAS=1``. The wheels are kept in
``$TQ_WHEELHOUSE`` (default ``~/.cache/celery-tq-wheelhouse``), so after the first run nothing is
downloaded and each virtualenv installs offline in seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REDIS_TRANSPORT_DB, REDIS_UNIT_DB, REQUIRE_SERVICES
from tests.ports import free_port
from tests.registry_support import pg_url

__all__ = ["pg_url"]

ROOT = Path(__file__).parents[2]
PROBE = ROOT / "tests" / "extras" / "extra_probe.py"
WHEELHOUSE = Path(os.environ.get("TQ_WHEELHOUSE") or Path.home() / ".cache" / "celery-tq-wheelhouse")
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]

# Three virtualenvs and pip: about 35 s with a warm wheelhouse. CI (TQ_REQUIRE_SERVICES=1) runs
# them; elsewhere TQ_TEST_EXTRAS=1 does.
pytestmark = [
    pytest.mark.extras,
    pytest.mark.xdist_group("extras_install"),  # one worker builds the wheel (module fixture, in ROOT)
    pytest.mark.skipif(
        not (REQUIRE_SERVICES or os.environ.get("TQ_TEST_EXTRAS") == "1"),
        reason="per-extra virtualenvs run in CI (TQ_REQUIRE_SERVICES=1) or with TQ_TEST_EXTRAS=1",
    ),
]


def pip_wheel(*args: str, cwd: Path = ROOT) -> None:
    """``pip wheel`` from the wheelhouse alone if it has everything, else from the index too."""
    base = [*PIP, "wheel", "-w", str(WHEELHOUSE), "--find-links", str(WHEELHOUSE), *args]
    offline = subprocess.run([*base, "--no-index"], cwd=cwd, capture_output=True, text=True)
    if offline.returncode != 0:
        subprocess.run(base, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def celery_tq_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout built as a wheel; its dependencies (all extras) in the wheelhouse.

    Built from a copy of what the package is made of: a build in the checkout itself writes its
    ``build/`` directory there, and a second build (this fixture again after xdist ran another
    module's tests on the worker, or ``make`` in the checkout) failed on what the first left."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "celery_tq", source / "celery_tq", ignore=shutil.ignore_patterns("__pycache__"))
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    pip_wheel("setuptools>=68", "wheel")  # what the build needs, for offline builds
    pip_wheel(".[redis,postgres,flower]", cwd=source)
    built = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-index", "--find-links", str(WHEELHOUSE), "-w", str(built), "."],
        cwd=source,
        check=True,
        timeout=300,
    )
    [wheel] = built.glob("celery_tq-*.whl")
    return wheel


def venv_with(extra: str, wheel: Path, where: Path) -> Path:
    """A clean virtualenv with celery-tq[extra] and nothing else; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    requirement = f"celery-tq[{extra}] @ {wheel.as_uri()}"
    install = ["--python", str(python), "install", "--no-index", "--find-links", str(WHEELHOUSE)]
    subprocess.run([*PIP, *install, requirement], check=True, timeout=300)
    return python


def probe(python: Path, *args: str, **urls: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TQ_DATA_DIR", "TQ_ENV")}
    env.update(PROBE_BROKER=urls["broker"], PROBE_BACKEND=urls["backend"], TQ_DATA_DIR=urls["data"])
    done = subprocess.run(
        [str(python), str(PROBE), *args],
        cwd=PROBE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and "probe ok" in done.stdout, done.stdout + done.stderr


@pytest.fixture
def redis_probe_dbs(redis_host: str) -> Iterator[tuple[str, str]]:
    import redis

    urls = (f"redis://{redis_host}/{REDIS_TRANSPORT_DB}", f"redis://{redis_host}/{REDIS_UNIT_DB}")
    for url in urls:
        redis.Redis.from_url(url).flushdb()
    yield urls
    for url in urls:
        redis.Redis.from_url(url).flushdb()


def test_redis_extra_alone_runs_a_task_on_redis(
    celery_tq_wheel: Path, tmp_path: Path, redis_probe_dbs: tuple[str, str]
) -> None:
    python = venv_with("redis", celery_tq_wheel, tmp_path / "venv")
    broker, results = redis_probe_dbs
    probe(python, "redis", broker=f"tq+{broker}", backend=f"tq+{results}", data=str(tmp_path))


def test_postgres_extra_alone_runs_a_task_with_records_in_postgresql(
    celery_tq_wheel: Path, tmp_path: Path, pg_url: str
) -> None:
    python = venv_with("postgres", celery_tq_wheel, tmp_path / "venv")
    broker = f"tq+sqlite:///{tmp_path / 'broker.db'}"
    probe(python, "postgres", broker=broker, backend=f"tq+{pg_url}", data=str(tmp_path))


def test_flower_extra_alone_runs_flower_that_sees_a_task(celery_tq_wheel: Path, tmp_path: Path) -> None:
    python = venv_with("flower", celery_tq_wheel, tmp_path / "venv")
    broker, backend = (f"tq+sqlite:///{tmp_path / name}" for name in ("broker.db", "results.db"))
    probe(python, "flower", str(free_port()), broker=broker, backend=backend, data=str(tmp_path))
