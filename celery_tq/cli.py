"""``celery -A mod tq ...``: the plugin's commands beside ``celery worker``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from celery.bin.base import CeleryCommand
from rich.console import Console
from rich.table import Table

from celery_tq.system import system_for

__all__ = ["tq"]


@click.group(name="tq")
def tq() -> None:
    """celery-tq: check the configuration (more commands come with the registry)."""


@tq.command(cls=CeleryCommand)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.pass_context
def check(ctx: click.Context, as_json: bool) -> None:
    """Report configuration problems; exit 1 when any finding is an error."""
    app = ctx.obj.app
    findings = system_for(app).check()
    if as_json:
        click.echo(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        _print_findings(findings)
    if any(f.level == "error" for f in findings):
        sys.exit(1)


def _print_findings(findings: list[Any]) -> None:
    console = Console()
    if not findings:
        console.print("[green]no findings[/green]: the configuration looks right")
        return
    table = Table("level", "code", "finding", "fix")
    colours = {"error": "red", "warning": "yellow", "info": "cyan"}
    for f in findings:
        table.add_row(f"[{colours[f.level]}]{f.level}[/]", f.code, f.message, f.fix)
    console.print(table)
