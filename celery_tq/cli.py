"""``celery -A mod tq ...``: the plugin's commands beside ``celery worker``."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime, timedelta
from typing import Any, NoReturn

import click
from celery.bin.base import CeleryCommand
from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from celery_tq import checks
from celery_tq.monitoring.record_text import (
    duration,
    error_line,
    parse_state,
    short_ids,
    short_when,
    tags_text,
    traceback_chain,
    when,
)
from celery_tq.registry.capture import registry_url
from celery_tq.system import system_for

__all__ = ["tq"]


@click.group(name="tq")
def tq() -> None:
    """celery-tq: the task registry (tasks, show, purge, lost) and configuration checks."""


@tq.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--offline", is_flag=True, help="Do not connect to the broker and the registry store.")
@click.pass_context
def check(ctx: click.Context, as_json: bool, offline: bool) -> None:
    """Report configuration problems and servers that do not answer; exit 1 on any error."""
    app = ctx.obj.app
    try:
        system_for(app)
        findings = checks.run(app, reach=not offline)
    except Exception as exc:  # an app without tq, a URL that cannot even be parsed
        _fail(f"celery-tq check: {exc}")
    if as_json:
        click.echo(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        _print_findings(findings)
    if any(f.level == "error" for f in findings):
        sys.exit(1)


def _print_findings(findings: list[Any]) -> None:
    console = Console()
    if not findings:
        console.print("[green]no findings[/green]: the configuration looks right and its servers answer")
        return
    table = Table("level", "code", "finding", "fix")
    colours = {"error": "red", "warning": "yellow", "info": "cyan"}
    for f in findings:
        table.add_row(f"[{colours[f.level]}]{f.level}[/]", f.code, f.message, f.fix)
    console.print(table)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _seconds(text: str) -> float:
    match = _DURATION.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 1h, 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _when(text: str | None) -> datetime | None:
    """An ISO 8601 time (naive = local time) or a duration back from now (``1h``, ``7d``)."""
    if text is None:
        return None
    if _DURATION.match(text.strip()):
        return datetime.now().astimezone() - timedelta(seconds=_seconds(text))
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither an ISO 8601 time nor a duration like 1h") from None


def _state_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return None if value is None else parse_state(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_COLUMNS = ("id", "name", "state", "prio", "tags", "queue", "submitted", "runtime", "tries", "error")


@tq.command(cls=CeleryCommand)
@click.option(
    "--state",
    callback=_state_option,
    help="SUCCESS, FAILURE, QUEUED, STARTED, RETRY, REVOKED, REJECTED (any case; Flower's words: FAILED).",
)
@click.option("--tag", "tags", multiple=True, help="Only tasks with this tag (repeat: all of them).")
@click.option("--name", help="Only tasks of this name.")
@click.option("--queue", help="Only tasks sent to this queue.")
@click.option("--priority", type=click.IntRange(0, 9), help="Only tasks of this priority.")
@click.option("--since", help="Submitted since: ISO time or a duration back from now (1h, 7d).")
@click.option("--until", help="Submitted until: ISO time or a duration back from now.")
@click.option("--root", "root_id", help="Only the tasks of this chain/workflow (its root id).")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of records.")
@click.pass_context
def tasks(ctx: click.Context, /, as_json: bool, **filters: Any) -> None:
    """List task records, newest first: celery -A mod tq tasks --tag billing --state FAILURE --since 1h

    On a terminal: a table; piped: tab-separated columns with a header line, nothing cut."""
    filters["since"], filters["until"] = _when(filters["since"]), _when(filters["until"])
    filters["tags"] = filters["tags"] or None
    try:
        records = system_for(ctx.obj.app).registry.query(**filters)
    except Exception as exc:  # an app without tq, an unreachable store
        _fail(f"celery-tq tasks: {exc}")
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in records], indent=2, default=str))
        return
    rows = [
        (
            r.id,
            r.name or "",
            r.state,
            "" if r.priority is None else str(r.priority),
            ",".join(sorted(r.tags)),
            r.queue or "",
            when(r.submitted_at),
            duration(r.runtime),
            str(r.retries),
            error_line(r.error),
        )
        for r in records
    ]
    console = Console()
    if not console.is_terminal:
        click.echo("\t".join(_COLUMNS))
        for row in rows:
            click.echo("\t".join(" ".join(cell.split()) for cell in row))
        return
    # A terminal gets short unique id prefixes (``tq show`` takes them, as git does); a narrow
    # one leaves out queue and tries and lists the errors under the table, so nothing is cut.
    ids = short_ids([r.id for r in records])
    wide = console.width >= 120
    shown = [c for c in _COLUMNS if wide or c not in ("queue", "tries", "error")]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in shown:
        table.add_column(column, no_wrap=column not in ("error", "tags"), overflow="fold")
    for r, row in zip(records, rows, strict=True):
        cells = dict(zip(_COLUMNS, row, strict=True))
        cells.update(id=ids[r.id], submitted=short_when(r.submitted_at))
        table.add_row(*(_state(cells[c]) if c == "state" else escape(cells[c]) for c in shown))
    console.print(table)
    if not wide:
        for r in records:
            if r.error:
                console.print(f"{ids[r.id]}: {escape(error_line(r.error))}", highlight=False)
    console.print(f"{len(records)} task(s)")


@tq.command(cls=CeleryCommand)
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.pass_context
def show(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """Show one task's record, with its error and the whole traceback; exit 1 if there is none."""
    try:
        registry = system_for(ctx.obj.app).registry
        record = registry.get(task_id)
        if record is None and len(task_id) >= _MIN_PREFIX:
            record = _by_prefix(registry, task_id)
    except Exception as exc:
        _fail(f"celery-tq show: {exc}")
    if record is None:
        click.echo(f"no record of task {task_id}", err=True)
        sys.exit(1)
    data = record.as_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    shown: dict[str, str] = {}
    for key, value in data.items():
        if key in ("submitted_at", "started_at", "finished_at"):
            shown[key] = when(getattr(record, key))
        elif key == "runtime":
            shown[key] = duration(record.runtime)
        elif key == "tags":
            shown[key] = tags_text(record.tags)
        elif key == "error":
            shown[key] = error_line(record.error)
        elif key == "result":
            shown[key] = "" if value is None else json.dumps(value, default=str)
        else:
            shown[key] = "" if value is None else str(value)
    console = Console()
    table = Table("field", "value", show_header=False)
    for key, text in shown.items():
        table.add_row(key, _state(text) if key == "state" else escape(text))
    console.print(table)
    if record.error:
        chain = traceback_chain(record.error)
        for line in record.error.get("context") or ():
            if f"context: {line}" not in chain:  # the traceback shows them as notes
                click.echo(f"context: {line}")
        click.echo(chain)  # as is: long lines stay whole


_MIN_PREFIX = 4
_PREFIX_SCAN = 10_000


def _by_prefix(registry: Any, prefix: str) -> Any:
    """The one record among the newest ``_PREFIX_SCAN`` whose id starts with ``prefix``."""
    found = [r for r in registry.query(limit=_PREFIX_SCAN) if r.id.startswith(prefix)]
    if len(found) > 1:
        _fail(f"celery-tq show: {prefix} is the start of {len(found)} task ids; give more of it")
    return found[0] if found else None


@tq.command(cls=CeleryCommand)
@click.option("--older-than", help="A duration (90s, 30m, 12h, 7d); default: tq_result_expires.")
@click.pass_context
def purge(ctx: click.Context, older_than: str | None) -> None:
    """Delete task records submitted longer ago than --older-than."""
    system = system_for(ctx.obj.app)
    seconds = _seconds(older_than) if older_than else system.settings.result_expires
    purged = system.registry.purge(seconds)
    click.echo(f"purged {purged} task record(s) older than {timedelta(seconds=seconds)}")


@tq.command(cls=CeleryCommand)
@click.option(
    "--older-than", default="10m", show_default=True, help="QUEUED for longer than this (90s, 30m, 2h)."
)
@click.option("--resend", is_flag=True, help="Publish each again: same id, name, queue, priority, tags.")
@click.option(
    "--mark",
    is_flag=True,
    help="End each as FAILURE (ResourceUnavailable); with --resend: those not re-sent.",
)
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=10_000,
    show_default=True,
    help="QUEUED records looked at, oldest first (run again for the next ones).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON list of the lost tasks and what was done."
)
@click.pass_context
def lost(ctx: click.Context, older_than: str, resend: bool, mark: bool, limit: int, as_json: bool) -> None:
    """List tasks lost in the broker: QUEUED longer than --older-than, no message left anywhere in
    the broker (queues, reserved by a worker, waiting for an ETA). Redis and the embedded broker.

    --resend publishes each again when its record kept the whole call (result_extended, arguments
    up to 1 KiB of JSON), else says so and leaves it (exit 1); --mark ends each as FAILURE, so
    get() raises ResourceUnavailable; both: re-send what can be, mark the rest."""
    from celery_tq.recovery import lost as lost_tasks

    seconds = _seconds(older_than)
    app = ctx.obj.app
    try:
        registry = system_for(app).registry
        found = lost_tasks.find_lost(app, registry, seconds, limit)
    except Exception as exc:  # RabbitMQ, an unreachable broker or store, an app without tq
        _fail(f"celery-tq lost: {exc}")
    now = time.time()
    done: list[dict[str, Any]] = []
    left = 0
    for task in found:
        record = task.record
        entry: dict[str, Any] = {
            "id": record.id,
            "name": record.name,
            "queue": record.queue,
            "priority": record.priority,
            "tags": sorted(record.tags),
            "submitted_at": record.submitted_at.isoformat() if record.submitted_at else None,
            "age_seconds": round(task.age(now), 3),
            "resendable": task.call is not None,
            "action": "listed",
        }
        try:
            if resend and task.call is not None:
                lost_tasks.resend(app, task)
                entry["action"] = "resent"
            elif mark:
                lost_tasks.mark(app, registry, task)
                entry["action"] = "marked"
            elif resend:
                entry.update(action="left", reason="cannot re-send: arguments not kept")
                left += 1
        except Exception as exc:  # one task's failure never stops the others
            entry.update(action="failed", reason=str(exc).splitlines()[0] if str(exc) else repr(exc))
            left += 1
        done.append(entry)
    if as_json:
        click.echo(json.dumps(done, indent=2))
    else:
        _print_lost(done, seconds, resend or mark)
    if left:
        sys.exit(1)


def _print_lost(done: list[dict[str, Any]], seconds: float, acted: bool) -> None:
    cut = timedelta(seconds=seconds)
    if not done:
        click.echo(f"no task lost in the broker (QUEUED longer than {cut} with no message left)")
        return
    if acted:
        words = {"resent": "re-sent", "marked": "marked FAILURE: lost in the broker"}
        for entry in done:
            text = words.get(entry["action"]) or entry.get("reason") or entry["action"]
            click.echo(f"{entry['id']} {entry['name'] or ''}: {text}")
    else:
        click.echo("\t".join(("id", "name", "queue", "age")))
        for entry in done:
            age = duration(entry["age_seconds"])
            click.echo("\t".join((entry["id"], entry["name"] or "", entry["queue"] or "", age)))
    click.echo(f"{len(done)} task(s) lost in the broker (QUEUED longer than {cut}, no message left)")


def _state(state: str) -> str:
    colour = {"SUCCESS": "green", "FAILURE": "red", "RETRY": "yellow", "REVOKED": "magenta"}.get(state)
    return f"[{colour}]{state}[/]" if colour else state


@tq.command(cls=CeleryCommand)
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print snapshots as JSON (one per line).")
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True)
@click.option("--svg", type=click.Path(dir_okay=False), help="With --once: also save the view as SVG.")
@click.pass_context
def status(ctx: click.Context, once: bool, as_json: bool, interval: float, svg: str | None) -> None:
    """Live view: queue depth per priority, running tasks, throughput, failures by tag, waits."""
    from celery_tq.monitoring.monitor import snapshot
    from celery_tq.monitoring.status_view import render

    app = ctx.obj.app
    try:
        registry = system_for(app).registry
        snap = snapshot(app, registry)
    except Exception as exc:  # a wrong broker URL, an unreachable store, an app without tq
        _fail(f"celery-tq status: {exc}")
    if once and not snap.counts:
        _fail(f"celery-tq status: no task recorded yet in {registry_url(app)}")
    if as_json:
        while True:
            click.echo(json.dumps(snap.as_dict(), default=str))
            if once:
                return
            time.sleep(interval)
            snap = snapshot(app, registry)
    console = Console(record=bool(svg))
    if once:
        console.print(render(snap))
        if svg:
            console.save_svg(svg, title="celery tq status")
        return
    with Live(render(snap), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            live.update(render(snapshot(app, registry)))


@tq.command(cls=CeleryCommand)
@click.option("--port", type=click.IntRange(1, 65535), default=9808, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True)
@click.pass_context
def exporter(ctx: click.Context, port: int, address: str) -> None:
    """Serve Prometheus metrics: queue depth and waits by priority, tasks by state and name."""
    from prometheus_client import CollectorRegistry, start_http_server

    from celery_tq.monitoring.exporter import TqCollector

    app = ctx.obj.app
    try:
        metrics = CollectorRegistry()
        metrics.register(TqCollector(app, system_for(app).registry))
        start_http_server(port, addr=address, registry=metrics)
    except Exception as exc:
        _fail(f"celery-tq exporter: {exc}")
    click.echo(f"celery-tq exporter: http://{address}:{port}/metrics")
    while True:
        time.sleep(3600)


def _fail(message: str) -> NoReturn:
    click.echo(message.splitlines()[0] if message else "failed", err=True)
    sys.exit(1)
