"""A fleet of 3 hosts (network namespaces, c=1 each) under host loss, partition and power cut.

    .venv/bin/python benchmarks/fleet.py [--tasks 3000] [--ms 10] [--faults host_loss,partition,power_cut]
                                              [--brokers redis,rabbitmq] [--partition 35] [--no-priority]

Needs root (``ip netns``). Builds the fleet of ``tests/fleet`` for each row: a bridge, a server
namespace forwarding to the shared Redis / RabbitMQ / PostgreSQL on 127.0.0.1, one namespace per
host running a real ``celery worker -c 1`` (production preset, ``tq+postgresql://`` registry in a
schema of its own; ``tq+redis://`` on Redis db TQ_TEST_REDIS_DB_BASE (12), or a RabbitMQ vhost of
its own). It sends ``--tasks`` tasks of ``--ms``, and when a quarter have run hits host 0:
``host_loss`` = kill -9 of every process in its namespace; ``partition`` = its link down for
``--partition`` s, then up; ``power_cut`` = link down, 5 s later kill -9.

Columns (from a ledger the tasks append to, independent of Celery and the registry): lost = tasks
that never ended; duplicates = runs beyond the first (in brackets: of tasks none of whose runs
had started within 0.5 s of the fault, i.e. reserved, not in flight); held = tasks host 0 had
received and not finished; redelivery = fault to the last held task's start on another host;
stall = the longest gap between two task events on a healthy host while fresh work was queued;
host 0 back = link up to host 0 running a task sent to it alone; records = SUCCESS records in
the registry at the end. Then one priority row per broker: per CRITICAL task sent behind a LOW
backlog, how many LOW tasks started between its sending and its start (bound: hosts x (c+1) = 6).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fleet import netns, scenario  # noqa: E402


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--ms", type=float, default=10.0)
    parser.add_argument("--faults", default="host_loss,partition,power_cut")
    parser.add_argument("--brokers", default="redis,rabbitmq")
    parser.add_argument("--partition", type=float, default=35.0)
    parser.add_argument("--no-priority", action="store_true")
    parser.add_argument("--keep", type=Path, help="a directory for each row's ledger and worker logs")
    args = parser.parse_args()
    why = netns.can_run()
    if why:
        print(f"cannot build a fleet here: {why}", file=sys.stderr)
        return 2
    rows = []
    print(scenario.HEADER, flush=True)
    for fault in args.faults.split(","):
        for broker in args.brokers.split(","):
            began = time.monotonic()
            outcome = scenario.run(
                fault, broker, tasks=args.tasks, ms=args.ms, partition_s=args.partition, keep=args.keep
            )
            rows.append(outcome)
            print(outcome.row(), f"<!-- {time.monotonic() - began:.0f} s -->", flush=True)
    if not args.no_priority:
        print("\n| broker | LOW tasks started before a CRITICAL one, per try | bound |\n|---|---|---|")
        for broker in args.brokers.split(","):
            overtaken = scenario.priority_run(broker)
            print(f"| {broker} | {', '.join(map(str, overtaken))} | 6 |", flush=True)
    ok = all(o.lost == 0 and o.terminal and o.duplicates_not_started == 0 and o.duplicates <= 1 for o in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
