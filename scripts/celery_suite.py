"""Run Celery's own integration suite against celery-tq and against plain Celery, in one run.

    .venv/bin/python scripts/celery_suite.py                      # the five files, four configurations
    .venv/bin/python scripts/celery_suite.py --files test_tasks.py test_canvas.py --configs plain installed

The integration tests of the *installed* Celery version come from its sdist (``pip download``),
into ``.celery_suite/``. Each configuration runs against a private ``redis-server`` of its own (a
free port on 127.0.0.1; the suite's side channel uses its db 0, so a shared Redis would mix runs),
one after the other, or all at once with ``--parallel`` (most of the suite's time is waiting).
The configurations:

- ``plain``: ``redis://`` broker and backend, plain Celery (the reference);
- ``tq-backend``: ``redis://`` broker, ``tq+redis://`` backend;
- ``tq``: ``tq+redis://`` broker and backend, plain Celery apps (the transport registered with
  ``celery_tq.transport.register_transports()``, which ``install`` would do);
- ``installed``: the same, the app passed through ``celery_tq.install(app, preset="production")``
  with ``TqTask`` as its task class (``celery_suite_plugin.py``), as a user would.

The suite skips tests gated on ``result_backend.startswith("redis")`` (or ``broker_url``, or a
broker URL's scheme); they use Redis only as a side channel (or, in test_connection_recovery, a
TCP proxy to it), so the gate is read with a ``tq+`` prefix removed. ``RACES`` are
races in the suite's own tests, fixed in the copy every configuration runs (plain Celery's too).
A failure in a tq configuration that plain Celery does not have is a regression, unless
``celery_suite_differences.txt`` lists the test as a documented deliberate difference (README,
"Differences from plain Celery").
Exit status 1 when there is any.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import celery
import redis

HERE = Path(__file__).resolve().parent
FILES = [
    "test_tasks.py",
    "test_canvas.py",
    "test_inspect.py",
    "test_group_chains.py",
    "test_connection_recovery.py",
]
# name: (broker, backend, what celery_suite_plugin does to the apps: "" nothing, see its docstring)
CONFIGS = {
    "plain": ("redis://{redis}/1", "redis://{redis}/2", ""),
    "tq-backend": ("redis://{redis}/1", "tq+redis://{redis}/2", ""),
    "tq": ("tq+redis://{redis}/1", "tq+redis://{redis}/2", "transport"),
    "installed": ("tq+redis://{redis}/1", "tq+redis://{redis}/2", "install"),
}
GATE = re.compile(r"\.(result_backend|broker_url)\.startswith\(")
SCHEME_GATE = re.compile(r"urlparse\((\w+)\)\.scheme (!=|==) ")  # test_connection_recovery's
# (file, text, replacement): races in the suite's tests, fixed for every configuration alike.
RACES = [
    # test_replaced_task_nesting_level_0 resets the flag its task_received handler sets only after
    # delay() has returned; the session worker runs in the test's own process, and its consumer
    # thread often takes the GIL (and fires task_received) before delay() returns: the reset then
    # erases the handler's True. Measured in a loop of 200 sends: plain Celery 47 times, the tq
    # transport 148 times (60 sends after 0.3 s idle: 0 and 10). Reset before sending instead.
    (
        "test_tasks.py",
        "        res = non_replaced_task.delay()\n        assertion_result = False\n",
        "        assertion_result = False\n        res = non_replaced_task.delay()\n",
    ),
]


@dataclass
class Outcome:
    passed: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    skipped: set[str] = field(default_factory=set)
    seconds: float = 0.0
    exit_code: int | None = None  # pytest's: 0 all passed, 1 some failed, anything else incomplete

    @property
    def reported(self) -> set[str]:
        return self.passed | self.failed | self.skipped

    def incomplete(self) -> str | None:
        """Why this run says nothing about compatibility (None: it ran to its end)."""
        if self.exit_code not in (0, 1):
            return f"pytest ended with exit code {self.exit_code} (interrupted, crashed or collected nothing)"
        if not self.passed:
            return "no test passed"
        return None


def fetch_suite(workdir: Path) -> Path:
    """``.celery_suite/celery-<version>`` holding the sdist's ``t/`` and pytest configuration."""
    version = celery.__version__
    root = workdir / f"celery-{version}"
    if not (root / "t" / "integration" / "conftest.py").exists():
        workdir.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, "-d", str(workdir), f"celery=={version}"], check=True)
        with tarfile.open(workdir / f"celery-{version}.tar.gz") as archive:
            tops = (["t"], ["pyproject.toml"])
            wanted = [m for m in archive.getmembers() if m.name.split("/")[1:2] in tops]
            archive.extractall(workdir, members=wanted, filter="data")
    patch_suite(root / "t" / "integration")
    return root


def patch_suite(tests: Path) -> None:
    """The gates read without ``tq+``, and the ``RACES`` fixed (idempotent)."""
    for test_file in tests.glob("*.py"):
        text = test_file.read_text()
        patched = GATE.sub(lambda m: f".{m.group(1)}.removeprefix('tq+').startswith(", text)
        patched = SCHEME_GATE.sub(
            lambda m: f"urlparse({m.group(1)}).scheme.removeprefix('tq+') {m.group(2)} ", patched
        )
        for name, race, fixed in RACES:
            if test_file.name == name and race in patched:
                patched = patched.replace(race, fixed)
        if patched != text:
            test_file.write_text(patched)
    for name, _race, fixed in RACES:
        if fixed not in (tests / name).read_text():
            print(f"warning: the race fix for {name} no longer applies to this Celery version", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen([*args, "--dir", str(directory)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return server, port
        except redis.ConnectionError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("the private redis-server did not start")


def run_config(name: str, suite: Path, files: list[str], extra: list[str], out: Path) -> Outcome:
    """One configuration, in a copy of the suite of its own (its ``integration-tests-config.json``)."""
    broker, backend, installed = CONFIGS[name]
    root = out / f"suite-{name}"
    shutil.copytree(suite, root)
    # The user's own queue: Celery's fixtures check that tests use only the "celery" queue.
    overrides = {"task_default_queue": "celery"} if installed == "install" else {}
    (root / "integration-tests-config.json").write_text(json.dumps(overrides))
    server, port = start_redis(root)
    try:
        return _run(name, root, port, files, extra, out, installed, broker, backend)
    finally:
        server.terminate()
        server.wait(10)


def _run(
    name: str,
    root: Path,
    port: int,
    files: list[str],
    extra: list[str],
    out: Path,
    installed: str,
    broker: str,
    backend: str,
) -> Outcome:
    env = dict(os.environ)
    env.update(
        TEST_BROKER=broker.format(redis=f"127.0.0.1:{port}"),
        TEST_BACKEND=backend.format(redis=f"127.0.0.1:{port}"),
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(port),
        PYTHONPATH=os.pathsep.join([str(root), str(HERE), env.get("PYTHONPATH", "")]),
        TQ_SUITE_PLUGIN=installed,
    )
    xml = out / f"{name}.xml"
    plugin = ["-p", "celery_suite_plugin"] if installed else []
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *plugin, "-q", "-rf"]
    command += [f"--junitxml={xml}", "-o", "junit_family=xunit2", "--timeout=300", *extra]
    command += [f"t/integration/{f}" for f in files]
    print(f"== {name}: broker {env['TEST_BROKER']}, backend {env['TEST_BACKEND']}", flush=True)
    started = time.monotonic()
    with open(out / f"{name}.log", "wb") as log:
        run = subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    outcome = read_junit(xml)
    outcome.seconds = time.monotonic() - started
    outcome.exit_code = run.returncode
    return outcome


def read_junit(xml: Path) -> Outcome:
    outcome = Outcome()
    if not xml.exists():
        return outcome
    for case in ET.parse(xml).iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome.failed.add(test_id)
        elif case.find("skipped") is not None:
            outcome.skipped.add(test_id)
        else:
            outcome.passed.add(test_id)
    return outcome


def documented_differences() -> dict[str, str]:
    """``test id -> reason`` from ``celery_suite_differences.txt`` (``<id>  # <reason>`` lines)."""
    found = {}
    for line in (HERE / "celery_suite_differences.txt").read_text().splitlines():
        test_id, _, reason = line.partition("#")
        if test_id.strip():
            found[test_id.strip()] = reason.strip()
    return found


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--files", nargs="+", default=FILES)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--workdir", type=Path, default=Path(".celery_suite"))
    parser.add_argument("--parallel", action="store_true", help="run the configurations at the same time")
    parser.add_argument("--no-compare", action="store_true", help="run only --configs, without plain Celery")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    root = fetch_suite(workdir)
    out = workdir / "results"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    configs = args.configs if "plain" in args.configs or args.no_compare else ["plain", *args.configs]
    with ThreadPoolExecutor(len(configs) if args.parallel else 1) as pool:
        runs = {c: pool.submit(run_config, c, root, args.files, args.pytest_args, out) for c in configs}
        outcomes = {c: run.result() for c, run in runs.items()}
    return report(outcomes, documented_differences(), args.files)


def report(outcomes: dict[str, Outcome], differences: dict[str, str], files: list[str]) -> int:
    plain = outcomes.get("plain", Outcome())
    print(f"\nCelery {celery.__version__} integration suite ({', '.join(files)})\n")
    print("| configuration | passed | failed | skipped | new failures | minutes |")
    print("|---|---|---|---|---|---|")
    regressions: dict[str, set[str]] = {}
    for name, outcome in outcomes.items():
        new = outcome.failed - plain.failed
        regressions[name] = {t for t in new if t not in differences}
        print(
            f"| {name} | {len(outcome.passed)} | {len(outcome.failed)} | {len(outcome.skipped)} "
            f"| {len(regressions[name])} | {outcome.seconds / 60:.1f} |"
        )
    for name, tests in regressions.items():
        for test_id in sorted(tests):
            print(f"NEW FAILURE [{name}] {test_id}")
        for test_id in sorted((outcomes[name].failed - plain.failed) & set(differences)):
            print(f"documented difference [{name}] {test_id}: {differences[test_id]}")
    # A run that did not reach its end (killed, crashed, nothing collected) would otherwise show
    # no new failures; so would a test that one configuration never reported.
    broken = False
    for name, outcome in outcomes.items():
        why = outcome.incomplete()
        if why is not None:
            print(f"INCOMPLETE RUN [{name}]: {why}; see {name}.log")
            broken = True
        elif name != "plain":
            for test_id in sorted(plain.reported - outcome.reported):
                print(f"NOT RUN [{name}] {test_id}: plain Celery's run reported it")
                broken = True
    return 1 if broken or any(regressions.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
