"""The broker connection of a busy worker is dropped (closed, refused for 5 s), twice: nothing is
lost and no task completes twice. A task whose run was cut comes back and runs again; one that had
finished, whose ack did not reach the broker, is acked without running (the registry knows)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from tests.tcp_proxy import TcpProxy
from tests.waiting import wait_for

from .conftest import Shop


def ledger(data_dir: str) -> Counter[tuple[str, str]]:
    path = Path(data_dir) / "ledger.log"
    lines = path.read_text().split("\n") if path.exists() else []
    return Counter(tuple(line.split(" ", 1)) for line in lines if line)  # type: ignore[misc]


def done(data_dir: str) -> int:
    return sum(n for (kind, _), n in ledger(data_dir).items() if kind == "done")


def test_a_dropped_broker_connection_loses_nothing_and_completes_nothing_twice(
    production_shop: Shop, data_dir: str
) -> None:
    port = urlsplit(production_shop.broker_url.removeprefix("tq+")).port or 5672
    with TcpProxy(port, refuse_for=5.0) as proxy:
        proxied = production_shop.broker_url.replace(f":{port}/", f":{proxy.port}/")
        worker = production_shop.start_worker(env={"TQSHOP_BROKER_URL": proxied})
        task = production_shop.app.tasks["tqshop.ledger"]
        labels = [f"t{i}" for i in range(20)]
        results = [task.delay(label, 0.3) for label in labels]
        for target in (4, 12):  # each drop right after a task finished: its ack may be in flight
            wait_for(lambda t=target: done(data_dir) >= t, 120, f"{target} tasks done", interval=0.002)
            proxy.drop()
        assert [r.get(timeout=180) for r in results] == labels  # nothing lost
        assert "Cannot connect to" in worker.log  # the drops reached the worker: refused while down
    runs = ledger(data_dir)
    assert {label: runs[("done", label)] for label in labels} == dict.fromkeys(labels, 1)
