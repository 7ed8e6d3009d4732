"""Which task ids a broker still holds: queued, reserved by a worker, or waiting for their ETA.

Read-only; nothing is consumed, moved or acked. Used by ``celery tq lost``.

- Redis (``redis://``, ``tq+redis://``, ``tq+sentinel://``, also a fleet mixing them): the queue
  lists of every priority step (``queue``, ``queue<sep><step>``) of the app's queues, the queues
  bound in kombu's binding sets and the queues asked for; kombu's ``unacked`` hash (what stock
  workers reserved, ETA tasks included); the ``tq+redis://`` processing lists ``_tq.proc.*``
  (what its consumers hold). Stock kombu 5.7 has no delayed-delivery set on Redis. Queues are
  read before what workers hold, so a message a worker fetches meanwhile is seen in one or the
  other; the caller reads twice to rule out the rarer moves back (a dead consumer's recovery).
- The embedded broker (``tq+sqlite://``): every task message in its table, owned or not.
- RabbitMQ: refused (``ConfigurationError``): its queues cannot be read without consuming.

Reads kombu's Redis channel attributes ``global_keyprefix``, ``sep``, ``priority_steps``,
``unacked_key``, ``keyprefix_queue`` and ``pool`` (kombu 5.7), not its private methods.
"""

from __future__ import annotations

import importlib
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

from celery import Celery
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from celery_tq.errors import ConfigurationError
from celery_tq.transport.redis_scripts import PROC_PREFIX

__all__ = ["check_readable", "task_ids"]

CHUNK = 1000
RABBITMQ_REFUSAL = (
    "RabbitMQ queues cannot be read without consuming their messages, so celery tq lost does not "
    "look: RabbitMQ keeps queued messages across restarts (durable queues, persistent messages: "
    "the presets' default); see a queue's messages in the management UI (Queues, Get messages)"
)


def check_readable(app: Celery) -> None:
    """Raise ``ConfigurationError`` (saying why) if :func:`task_ids` cannot read ``app``'s broker."""
    with app.connection_for_read() as conn:
        _refuse_unless(str(conn.transport.driver_type), conn, readable=("redis", "sqlite"))


def task_ids(app: Celery, queues: Iterable[str] = ()) -> set[str]:
    """The ids of the task messages ``app``'s broker holds anywhere (``queues``: also read these)."""
    with app.connection_for_read() as conn:
        driver = str(conn.transport.driver_type)
        _refuse_unless(driver, conn, readable=("redis", "sqlite"))
        kombu_redis: Any = importlib.import_module("kombu.transport.redis")
        from celery_tq.transport import sqlite

        channel = conn.default_channel
        if isinstance(channel, kombu_redis.Channel):
            return _redis_ids(channel, {*queues, *app.amqp.queues})
        if isinstance(channel, sqlite.Channel):
            return _sqlite_ids(str(channel.path))
        _refuse_unless(driver, conn, readable=())
        raise AssertionError("unreachable")


def _refuse_unless(driver: str, conn: Any, readable: tuple[str, ...]) -> None:
    if driver in readable:
        return
    if driver == "amqp":
        raise ConfigurationError(RABBITMQ_REFUSAL)
    raise ConfigurationError(
        f"celery tq lost cannot read the messages of a {driver} broker ({conn.as_uri()}): it reads "
        "Redis (redis://, tq+redis://, tq+sentinel://) and the embedded broker (tq+sqlite://)"
        + ("; memory:// keeps its messages inside one process" if driver == "memory" else "")
    )


def _redis_ids(channel: Any, queues: set[str]) -> set[str]:
    import redis

    prefix, sep = channel.global_keyprefix or "", channel.sep
    client = redis.Redis(connection_pool=channel.pool)  # no key prefixing: keys are built here
    try:
        names = queues | _bound_queues(client, prefix + channel.keyprefix_queue % "", sep)
        found: set[str] = set()
        for name in sorted(names):  # first the queues, then what workers hold (see the docstring)
            for step in channel.priority_steps:
                found.update(_ids(_list(client, prefix + (f"{name}{sep}{step}" if step else name))))
        found.update(_ids(_hash_values(client, prefix + channel.unacked_key)))
        for key in client.scan_iter(match=_glob(prefix + PROC_PREFIX) + "*", count=CHUNK):
            found.update(_ids(_list(client, key)))
        return found
    finally:
        client.close()


def _bound_queues(client: Any, binding_prefix: str, sep: str) -> set[str]:
    """The queues named in kombu's binding sets (``routing_key<sep>pattern<sep>queue``)."""
    names = set()
    for key in client.scan_iter(match=_glob(binding_prefix) + "*", count=CHUNK):
        for member in client.smembers(key):
            parts = bytes_to_str(member).split(sep)
            if len(parts) == 3 and parts[2]:
                names.add(parts[2])
    return names


def _list(client: Any, key: Any) -> Iterator[bytes]:
    # Left to right: producers push on the left, so a read may see a message twice, never skip one.
    start = 0
    while True:
        chunk = client.lrange(key, start, start + CHUNK - 1)
        yield from chunk
        if len(chunk) < CHUNK:
            return
        start += CHUNK


def _hash_values(client: Any, key: str) -> Iterator[bytes]:
    for _, value in client.hscan_iter(key, count=CHUNK):
        yield value


def _sqlite_ids(path: str) -> set[str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return _ids(payload for (payload,) in db.execute("SELECT payload FROM tq_message WHERE fanout = 0"))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return set()  # a broker nobody has published to yet
        raise
    finally:
        db.close()


def _ids(raws: Iterable[bytes | str]) -> set[str]:
    found = set()
    for raw in raws:
        task_id = _id_of(raw)
        if task_id:
            found.add(task_id)
    return found


def _id_of(raw: bytes | str) -> str | None:
    """The task id of a kombu envelope (or of kombu's ``unacked`` entry: [envelope, exchange, key])."""
    try:
        message = loads(bytes_to_str(raw))
    except (TypeError, ValueError):
        return None
    if isinstance(message, list) and message:
        message = message[0]
    if not isinstance(message, dict):
        return None
    headers = message.get("headers") or {}
    properties = message.get("properties") or {}
    task_id = headers.get("id") if isinstance(headers, dict) else None
    if task_id is None and isinstance(properties, dict):
        task_id = properties.get("correlation_id")  # task protocol 1
    return str(task_id) if task_id else None


def _glob(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
