"""What a record keeps of a call: small calls whole (enough to send them again), big ones not."""

from __future__ import annotations

from typing import Any

from kombu.utils.json import loads

from celery_tq.registry.call import CALL_META_MAX, bound_call, kept_call, published_call

HEADERS: dict[str, Any] = {
    "id": "t1",
    "task": "shop.charge",
    "eta": "2026-12-01T12:00:00+00:00",
    "expires": None,
    "timelimit": [40, 30],
    "tq_timeout": 30.0,
    "shadow": None,
    "group_index": None,
    "ignore_result": False,
}
LINK = {"task": "shop.receipt", "args": [], "kwargs": {}, "options": {}, "subtask_type": None}


def test_a_small_call_is_kept_with_what_sending_it_again_needs() -> None:
    meta = published_call(HEADERS, ((5, 9.5), {"vip": True}, {"callbacks": [LINK], "errbacks": None}))
    assert meta is not None
    call = kept_call(loads(meta))  # as the record stores it
    assert call is not None
    assert (call.args, call.kwargs) == ([5, 9.5], {"vip": True})
    assert call.options == {
        "eta": "2026-12-01T12:00:00+00:00",
        "ignore_result": False,
        "tq_timeout": 30.0,
        "link": [LINK],
        "time_limit": 40,
        "soft_time_limit": 30,
    }


def test_a_call_bigger_than_the_bound_is_not_kept() -> None:
    big = "x" * (CALL_META_MAX + 1)
    assert published_call(HEADERS, ((big,), {}, {})) is None
    assert published_call(HEADERS, ((), {"k": big}, {})) is None
    assert (
        published_call(HEADERS, ((), {}, {"chain": [{"task": big}]})) is None
    )  # a partial re-send would break it
    assert published_call(HEADERS, ((list(range(100_000)),), {}, {})) is None
    assert kept_call(None) is None
    assert kept_call({"args": [1], "kwargs": {}}) is None  # a worker's meta: no re-send options


def test_result_extended_meta_keeps_only_small_arguments() -> None:
    meta: dict[str, Any] = {"args": ["x" * 2000], "kwargs": {"n": 1}}
    bound_call(meta)
    assert meta == {"args": None, "kwargs": {"n": 1}}
