"""A small shop on celery-tq: the app the demo runs (``celery -A examples.shop worker``)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from celery import Celery

import celery_tq
from celery_tq import Priority, errors

# The demo's files (broker, results, task records) live in .celery_tq/demo of the checkout, so
# `celery -A examples.shop tq status` finds them from there without any variable.
os.environ.setdefault("TQ_DATA_DIR", str(Path(__file__).resolve().parents[1] / ".celery_tq" / "demo"))

app = Celery("shop")
tq = celery_tq.install(app, preset="development")


@tq.task(name="shop.charge", priority=Priority.HIGH, timeout=30, tags={"billing"})
def charge(order_id: int, amount: float) -> dict[str, object]:
    time.sleep(0.05)
    return {"order_id": order_id, "charged": amount}


@tq.task(name="shop.send_receipt", priority=Priority.LOW, tags={"email"})
def send_receipt(order_id: int) -> str:
    time.sleep(0.02)
    return f"receipt for order {order_id} sent"


@tq.task(name="shop.load_invoice", tags={"billing"}, max_retries=0)
def load_invoice(invoice_id: int) -> str:
    with celery_tq.context("loading invoice %s", invoice_id):
        return _read_pdf(f"/nonexistent/invoices/{invoice_id}.pdf")


def _read_pdf(path: str) -> str:
    with celery_tq.context("reading the PDF"), open(path) as f:
        return f.read()


@tq.task(name="shop.sync_stock", bind=True, max_retries=2, tags={"inventory"})
def sync_stock(self: celery_tq.TqTask) -> str:
    if self.request.retries < 2:
        raise errors.ResourceUnavailable("warehouse-api")
    return f"stock synced after {self.request.retries} retries"


@tq.task(name="shop.rebuild_report", priority=Priority.BACKGROUND, timeout=1, tags={"reports"})
def rebuild_report() -> None:
    time.sleep(random.uniform(5, 6))  # far past its 1 s timeout
