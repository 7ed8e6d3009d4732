"""The fleet harness (tests/fleet) without a fleet: its verdict on a ledger, and when it refuses."""

from __future__ import annotations

import pytest

from tests.fleet import scenario


def test_the_ledger_verdict_counts_runs_beyond_the_first_and_held_tasks() -> None:
    lines = [
        ["R", "a", "h0", "1.0"],
        ["S", "a", "h0", "1.1", "0"],
        ["E", "a", "h0", "1.1", "1.2"],
        ["R", "b", "h0", "1.3"],  # held by host 0 when the fault hit at 2.0
        ["S", "b", "h1", "9.0", "1"],
        ["E", "b", "h1", "9.0", "9.1"],
        ["S", "b", "h0", "40.0", "1"],  # run again after the partition: a duplicate not started
        ["E", "b", "h0", "40.0", "40.1"],
        ["S", "c", "h1", "1.0", "0"],
        ["E", "c", "h1", "1.0", "1.1"],
        ["S", "d", "h1", "4.0", "0"],
        ["E", "d", "h1", "4.0", "4.1"],
    ]
    out = scenario.analyse(lines, ["a", "b", "c", "d", "e"], "partition", "redis", 2.0, 37.0, 2)
    assert (out.lost, out.duplicates, out.duplicates_not_started, out.held) == (1, 1, 1, 1)
    assert out.redelivery_s == pytest.approx(7.0)
    assert out.stall_s == pytest.approx(2.9)  # on h1, between c's end and d's start


def test_a_fleet_is_not_built_without_root_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fleet import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "need root" in str(netns.can_run())
