"""Writes an event loop drives: what the hand-over (:mod:`celery_tq.worker.handoff`) needs of a store.

A loop writer owns one connection of a store's. Connecting is blocking (the caller does it off the
loop); :meth:`LoopWriter.send` sends one batch without waiting, and :meth:`LoopWriter.poll`, called
when the connection's socket is readable, tells when the batch is durable. Anything out of the
ordinary (no connection, a value it cannot send, an error from the store) is the caller's to hand
to the store's own blocking write, which retries while the store is down and isolates a record the
store refuses.

A writer may also encode a batch's commands where the rows are made (a pool process,
:meth:`LoopWriter.encode`), so that the loop only joins and sends them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from celery_tq.registry.record import Row

__all__ = ["LoopWriter", "NotSent", "loop_write_for"]


class NotSent(Exception):
    """This batch cannot go this way (the caller writes it with the store's own write)."""


class LoopWriter(Protocol):
    """One connection of a store's, for writes an event loop drives (one batch at a time)."""

    @property
    def closed(self) -> bool: ...

    @property
    def connected(self) -> bool: ...

    def fileno(self) -> int: ...

    def connect(self) -> None:
        """Open the connection (blocking: not on the loop)."""

    def encode(self, rows: Sequence[Row]) -> bytes | None:
        """The batch's commands for :meth:`send`, or None when :meth:`send` takes the rows."""

    def send(self, rows: Sequence[Row], encoded: Sequence[bytes]) -> None:
        """Send a batch: ``encoded`` is what :meth:`encode` made of its parts (one per part), or
        empty when any part has none (then ``rows``). ``NotSent`` when nothing was sent."""

    def poll(self) -> bool:
        """Read what arrived: True once the batch is durable, False while it runs. Raises when it
        failed (the connection is closed if it broke: nothing of the batch is known written)."""

    def close(self) -> None: ...


def loop_write_for(store: Any) -> LoopWriter | None:
    """A loop writer for ``store`` (not connected yet); None for a store whose outcomes only its
    own write can write."""
    from celery_tq.registry.redis import RedisStore
    from celery_tq.registry.redis_async import redis_loop_write
    from celery_tq.registry.sql import SqlStore
    from celery_tq.registry.sql_async import sql_loop_write

    if isinstance(store, SqlStore):
        return sql_loop_write(store)
    if isinstance(store, RedisStore):
        return redis_loop_write(store)
    return None
