"""The call a record keeps: small arguments only, enough to send a lost task again.

With ``result_extended`` (the presets turn it on) a record's meta holds the call's ``args`` and
``kwargs`` when each is at most ``CALL_META_MAX`` bytes of JSON; larger ones are not kept (the
record's ``args_repr``/``kwargs_repr`` still say what the call was). The client's ``QUEUED`` write
also keeps, under ``tq_resend``, what else a re-send needs to be the same message: its ETA,
expiry, time limits, tq timeout and canvas links (each at most ``CALL_META_MAX`` bytes in all).
``celery tq lost --resend`` re-sends a task only when its record holds all of it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kombu.utils.json import dumps

from celery_tq.client.limits import json_bounds
from celery_tq.metadata import HEADER_TIMEOUT

__all__ = ["CALL_META_MAX", "KeptCall", "bound_call", "kept_call", "published_call"]

CALL_META_MAX = 1024  # bytes of JSON: larger args/kwargs are not copied into the record's meta
RESEND = "tq_resend"
# message header -> Celery's send_task option of the same meaning
_HEADERS = {
    "eta": "eta",
    "expires": "expires",
    "shadow": "shadow",
    "group_index": "group_index",
    "ignore_result": "ignore_result",
    HEADER_TIMEOUT: HEADER_TIMEOUT,
}
_EMBED = {"callbacks": "link", "errbacks": "link_error", "chain": "chain", "chord": "chord"}


@dataclass(frozen=True)
class KeptCall:
    """A call as its record keeps it: what ``app.send_task`` needs besides the record's fields."""

    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]


def bound_call(meta: dict[str, Any]) -> None:
    """Drop ``args``/``kwargs`` of ``meta`` (Celery's ``result_extended`` copy) that are too big."""
    for key in ("args", "kwargs"):
        if meta.get(key) is not None and not _fits(meta[key]):
            meta[key] = None


def published_call(headers: Mapping[str, Any], body: Any) -> str | None:
    """The meta of a ``QUEUED`` write as JSON: the call as published, or None if too big to keep."""
    if not isinstance(body, list | tuple) or len(body) != 3:
        return None  # not a protocol 2 body
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, Mapping):
        return None
    options = {key: headers[key] for key in _HEADERS if headers.get(key) is not None}
    limits = headers.get("timelimit")
    if limits and any(limits):
        options["timelimit"] = list(limits)
    if isinstance(embed, dict):
        options.update({key: embed[key] for key in _EMBED if embed.get(key)})
    call = {"args": args, "kwargs": kwargs, RESEND: options}
    if not _at_most(call, 3 * CALL_META_MAX):  # a big call costs one short walk, never its JSON
        return None
    try:
        text = _encode(call)
        if len(text) <= CALL_META_MAX or all(
            len(_encode(part)) <= CALL_META_MAX for part in (args, kwargs, options)
        ):
            return text
    except (TypeError, ValueError):  # not JSON: Celery's own encoding error says so at publish
        pass
    return None


def _encode(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:  # datetimes, UUIDs, decimals: as kombu sends them
        return str(dumps(value))


def _at_most(value: Any, budget: int) -> bool:
    """A quick lower bound of ``value``'s JSON size is within ``budget`` (exact types only: fast)."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            budget -= len(item) + 2
        elif kind is list or kind is tuple:
            budget -= len(item) + 1
            if budget >= 0:
                stack.extend(item)
        elif kind is dict:
            budget -= 4 * len(item) + 1
            if budget >= 0:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif kind is int:
            budget -= item.bit_length() * 3 // 10 + 1
        elif kind is bytes or kind is bytearray:
            budget -= len(item)
        else:  # floats, bools, None, datetimes...: small
            budget -= 1
        if budget < 0:
            return False
    return True


def kept_call(meta: Mapping[str, Any] | None) -> KeptCall | None:
    """The call a ``QUEUED`` record's meta keeps, as ``send_task`` options; None if not kept."""
    if not meta or not isinstance(meta.get(RESEND), Mapping):
        return None
    args, kwargs, kept = meta.get("args"), meta.get("kwargs"), meta[RESEND]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return None
    options = {_HEADERS[k]: v for k, v in kept.items() if k in _HEADERS}
    options.update({_EMBED[k]: v for k, v in kept.items() if k in _EMBED})
    hard, soft = [*(kept.get("timelimit") or ()), None, None][:2]
    if hard or soft:
        options.update(time_limit=hard, soft_time_limit=soft)
    return KeptCall(args, kwargs, options)


def _fits(value: Any) -> bool:
    """Whether ``value`` is at most ``CALL_META_MAX`` bytes of JSON (measured only if unsure)."""
    low, high, walked = json_bounds(value)
    if walked and high <= CALL_META_MAX:
        return True
    if low > CALL_META_MAX:
        return False
    try:
        return len(dumps(value)) <= CALL_META_MAX
    except (TypeError, ValueError):
        return False
