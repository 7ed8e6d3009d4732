"""Faults benchmark: what celery-tq does when something fails, measured on the current code.

The production preset on its two setups (``tq+redis://`` broker and store; RabbitMQ with a
``tq+postgresql://`` store), ``celery worker -P prefork -c 2``. One row per scenario and setup
(the rows of issue 14); a scenario that does not apply to a setup is left out:

  frozen          the worker's broker links freeze (half-open, no FIN; TCP proxy), events on
  kill            ``--kills`` busy pool processes killed (-9) among ``--tasks`` x 1 s tasks
  poison          a task that kills its own process every time
  dropped         the worker's broker connections closed and refused for 5 s, twice, tasks in flight
  redelivered     (RabbitMQ) a finished task's message comes back unacked
  ids             a task id of 200 characters; a name, queue, tag too long for the store
  oversized       a 150 MB argument
  malformed       a body that is not JSON, with a task id header
  lost            (tq+redis) a Redis broker without persistence killed and restarted with tasks queued;
                  ``celery tq lost``, ``--resend``, a worker
  pickle          (in-process) a user config that accepts pickle
  time-limits     Celery's soft_time_limit/time_limit on the threads and solo pools
  forged          results written straight into the store: SystemExit, a 3,000-deep cause chain
  attrs           a user exception with an attribute (``exc.code = 402``)
  deliveries      kill -9 of the whole worker mid-task; another worker runs it
  store-down      ``get(timeout=3)`` while the result store is unreachable
  prefork-message Celery's soft_time_limit on prefork: the TaskTimeout message

After the table, one line says whether every row meets the requirement of issue 14 (exit 1 if not).

Usage: python benchmarks/faults.py [--redis-db 10] [--setup tq+redis|rabbitmq] [--only frozen,kill]
                                   [--tasks 50] [--kills 3]
Needs Redis 127.0.0.1:6379 (dbs N, N+1), redis-server on PATH, RabbitMQ 127.0.0.1:5672
(rabbitmqctl, a vhost of its own) and PostgreSQL 127.0.0.1:5432 database ``test`` (a schema of
its own). Takes about 6 minutes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from faultbench import config, inputs, links, workers  # noqa: E402
from faultbench.harness import APP, Outcome, Setup, rabbitmq_postgres, tq_redis  # noqa: E402

BOTH, REDIS, RABBITMQ, IN_PROCESS = ("tq+redis", "rabbitmq"), ("tq+redis",), ("rabbitmq",), ()

Scenario = Callable[[Setup, argparse.Namespace], Outcome]
SCENARIOS: dict[str, tuple[Scenario, tuple[str, ...]]] = {
    "frozen": (lambda s, a: links.frozen_link(s), BOTH),
    "kill": (lambda s, a: workers.kill_busy_children(s, a.tasks, a.kills), BOTH),
    "poison": (lambda s, a: workers.poison(s), BOTH),
    "dropped": (lambda s, a: links.dropped_link(s, a.tasks), BOTH),
    "redelivered": (lambda s, a: workers.redelivered_ended(s), RABBITMQ),
    "ids": (lambda s, a: inputs.unstorable_ids(s), BOTH),
    "oversized": (lambda s, a: inputs.oversized(s), BOTH),
    "malformed": (lambda s, a: inputs.malformed(s), BOTH),
    "lost": (lambda s, a: links.lost_in_broker(s), REDIS),
    "pickle": (lambda s, a: config.pickle_config(s), IN_PROCESS),
    "time-limits": (lambda s, a: config.celery_time_limits(s), BOTH),
    "forged": (lambda s, a: config.forged_result(s), BOTH),
    "attrs": (lambda s, a: config.custom_attributes(s), BOTH),
    "deliveries": (lambda s, a: workers.second_run(s), BOTH),
    "store-down": (lambda s, a: links.store_down(s), BOTH),
    "prefork-message": (lambda s, a: config.prefork_timeout_message(s), BOTH),
}
SETUP_NAMES = {"tq+redis": "tq+redis", "rabbitmq": "RabbitMQ+PG"}


def run_one(name: str, scenario: Scenario, setup: Setup | None, args: argparse.Namespace) -> Outcome:
    started = time.monotonic()
    try:
        outcome = scenario(setup, args)  # type: ignore[arg-type]
    except Exception as exc:  # one broken scenario still leaves the others' rows
        traceback.print_exc()
        outcome = Outcome(name, "-", f"ERROR {type(exc).__name__}: {exc}"[:200], False)
    label = setup.label if setup else "in-process"
    print(f"  {name} on {label}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--redis-db", type=int, default=10)
    parser.add_argument("--setup", choices=list(SETUP_NAMES), default=None, help="one setup only")
    parser.add_argument("--only", default="", help=f"comma-separated scenarios of: {', '.join(SCENARIOS)}")
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s] or list(SCENARIOS)
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    root = Path(tempfile.mkdtemp(prefix="tq-faults-"))
    (root / "faultbench_app.py").write_text(APP)
    sys.path.insert(0, str(root))
    makers: dict[str, Callable[[], Any]] = {
        "tq+redis": lambda: tq_redis(args.redis_db),
        "rabbitmq": rabbitmq_postgres,
    }
    rows: list[tuple[str, Any]] = []
    started = time.monotonic()
    with ExitStack() as stack:
        setups: dict[str, Setup] = {}
        for label, make in makers.items():
            if args.setup in (None, label) and any(label in SCENARIOS[n][1] for n in chosen):
                broker, backend = stack.enter_context(make())
                setups[label] = Setup(label, broker, backend, root)
        for name in chosen:
            scenario, applies = SCENARIOS[name]
            if not applies:
                rows.append(("in-process", run_one(name, scenario, None, args)))
            for label in applies:
                if label in setups:
                    rows.append((SETUP_NAMES[label], run_one(name, scenario, setups[label], args)))
    print(f"  all: {time.monotonic() - started:.0f} s", file=sys.stderr)
    if not rows:
        parser.error("none of those scenarios applies to that setup")
    print("| fault | setup | measured | outcome |")
    print("|---|---|---|---|")
    for setup_name, outcome in rows:
        print(f"| {outcome.fault} | {setup_name} | {outcome.measured} | {outcome.outcome} |")
    failing = [f"{o.fault} ({s})" for s, o in rows if not o.holds]
    print()
    print("Every row meets its requirement." if not failing else f"Requirement NOT met: {'; '.join(failing)}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
