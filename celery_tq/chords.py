"""Chords as Celery's Redis backend runs them, over the registry store's key-value space.

Celery's generic key-value chord join (``BaseKeyValueStoreBackend.on_chord_part_return``) makes
the last header task *wait* for every header result, inside the worker; a header task sitting in
the same worker's prefetch then never runs. Celery's ``RedisBackend`` does not wait: each header
task pushes its own result to the chord's list, and the one whose push completes the list
publishes the body with the results read back from it. :class:`ChordsMixin` does the same, with
the same keys (``<group key>.j`` results, ``.s`` size, ``.t`` tasks added by ``add_to_chord``,
``.c`` the dispatch claim) and the same errors, on every store (memory, SQLite, PostgreSQL, Redis).
Checked against celery 5.7.0 ``celery/backends/redis.py``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from celery import states
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult, allow_join_result
from kombu.utils.encoding import bytes_to_str

from celery_tq import celery_seam
from celery_tq.registry import Store

__all__ = ["ChordsMixin"]

logger = logging.getLogger("celery_tq.chords")

_DONE = b"done"


class ChordsMixin:
    """``on_chord_part_return``, ``set_chord_size``, ``add_to_chord`` and ``apply_chord``."""

    app: Any

    if TYPE_CHECKING:  # provided by TqBackend and Celery's BaseKeyValueStoreBackend (later in the MRO)

        @property
        def store(self) -> Store: ...

        def get_key_for_group(self, group_id: str, key: str = "") -> str: ...
        def encode(self, data: Any) -> bytes: ...
        def decode(self, payload: bytes) -> Any: ...
        def encode_result(self, result: Any, state: str) -> bytes: ...
        def exception_to_python(self, exc: Any) -> Exception: ...
        def chord_error_from_stack(self, callback: Any, exc: Exception | None = None) -> Any: ...
        @property
        def chord_expires(self) -> Any: ...

    def ensure_chords_allowed(self) -> None:
        return None

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        self.store.kv_delete(self._chord_key(group_id, ".c"))  # a re-applied frozen chord runs anew
        self.store.kv_set(self._chord_key(group_id, ".s"), str(chord_size).encode(), self._chord_ttl())

    def add_to_chord(self, group_id: str, result: Any) -> None:
        self.store.kv_incr(self._chord_key(group_id, ".t"), self._chord_ttl())

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        # A header holding groups keeps its shape: save it so the join returns nested lists.
        if celery_seam.is_lazy_header(header_result_args[1]):  # a generator header: kept lazy, as on Redis
            return
        header_result = self.app.GroupResult(*header_result_args)
        if any(isinstance(result, GroupResult) for result in header_result.results):
            key = bytes_to_str(self.get_key_for_group(header_result.id))
            value = self.encode({"result": header_result.as_tuple()})
            self.store.kv_set(
                key, value if isinstance(value, bytes) else str(value).encode(), self._chord_ttl()
            )

    def on_chord_part_return(
        self, request: Any, state: str, result: Any, propagate: Any = None, **kw: Any
    ) -> Any:
        task_id, group_id, index = request.id, request.group, request.group_index
        if not group_id or not task_id:
            return None
        store, ttl = self.store, self._chord_ttl()
        claim = self._chord_key(group_id, ".c")
        if store.kv_get([claim])[0] == _DONE:
            return None  # a late copy of a header task of a chord already done
        encoded = self.encode([1, task_id, state, self.encode_result(result, state)])
        score = float("inf") if index is None else float(index)
        ready = store.kv_push(
            self._chord_key(group_id, ".j"), f"{task_id}:{score}", score, _bytes(encoded), ttl
        )
        size, added = store.kv_get([self._chord_key(group_id, ".s"), self._chord_key(group_id, ".t")])
        if size is None or ready != int(size) + int(added or 0):
            return None
        # The claim expires, so a redelivered copy of this task can publish the body if this
        # process dies before it does (Celery's Redis backend: 2 x result_chord_join_timeout).
        join_timeout = float(self.app.conf.result_chord_join_timeout or 5.0)
        token = uuid4().hex.encode()
        if not store.kv_claim(claim, token, max(30.0, 2 * join_timeout)):
            return None  # another copy of the last header task is publishing the body
        callback: Any = maybe_signature(request.chord, app=self.app)
        try:
            results = self._join(group_id)
        except ChordError as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            store.kv_delete(self._chord_key(group_id, ".s"))  # a later copy must not fail it again
            return self.chord_error_from_stack(callback, exc)
        except Exception as exc:
            logger.exception("Chord %r raised: %r", group_id, exc)
            store.kv_delete(self._chord_key(group_id, ".s"))
            return self.chord_error_from_stack(callback, ChordError(f"Join error: {exc!r}"))
        try:
            celery_seam.publish_callback(self.app, callback.delay, results)
        except Exception as exc:
            logger.exception("Chord callback for %r raised: %r", group_id, exc)
            return self.chord_error_from_stack(callback, ChordError(f"Callback error: {exc!r}"))
        finally:
            # Unless the chord was applied again meanwhile (a frozen chord keeps its group id:
            # set_chord_size dropped our claim), its data goes, and late copies find it done.
            # One atomic step, as Celery's CHORD_CLEANUP_LUA: a re-apply landing between a check
            # and the deletes would lose its size and find its claim done (its body never sent).
            drop = [self._chord_key(group_id, suffix) for suffix in (".j", ".s", ".t")]
            if not store.kv_release(claim, token, drop, _DONE, max(float(ttl or 0), 300.0)):
                logger.info("Chord %r was applied again while its body was sent: its data stays", group_id)
        return None

    def _join(self, group_id: str) -> list[Any]:
        header_result: Any = GroupResult.restore(group_id, app=self.app)
        if header_result is not None:  # saved by apply_chord: a header holding groups
            header_result.on_ready()
            join = header_result.join_native if header_result.supports_native_join else header_result.join
            with allow_join_result():
                return list(join(timeout=self.app.conf.result_chord_join_timeout, propagate=True))
        return [self._unpack(entry) for entry in self.store.kv_list(self._chord_key(group_id, ".j"))]

    def _unpack(self, entry: bytes) -> Any:
        _, task_id, state, value = self.decode(entry)
        if state in states.EXCEPTION_STATES:
            value = self.exception_to_python(value)
        if state in states.PROPAGATE_STATES:
            reason = f"Dependency {task_id} raised {value!r}"
            raise celery_seam.chord_error_with_cause(reason, value)
        return value

    def _chord_key(self, group_id: str, suffix: str) -> str:
        return bytes_to_str(self.get_key_for_group(group_id, suffix))

    def _chord_ttl(self) -> float | None:
        expires = self.chord_expires
        if expires is None:
            return None
        seconds = expires.total_seconds() if hasattr(expires, "total_seconds") else float(expires)
        return seconds or None


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
