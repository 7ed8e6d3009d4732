"""``redis://host:port/db``: a hash per task plus sorted-set indexes scored by submitted_at.

Keys (prefix ``tq:``): ``t:<id>`` (the row), ``i:all``, ``i:state:<S>``, ``i:name:<N>``,
``i:queue:<Q>``, ``i:priority:<P>``, ``i:root_id:<R>`` (the tasks of a canvas, not its root),
``i:tag:<T>`` (indexes), ``kv:<key>``.
The forward-only merge and the index moves run in one Lua script per write, so concurrent
writers never interleave; a batch of writes is one pipeline. A terminal write is also published
on ``tq:<db>:done:<id>``, which wakes a client waiting in ``get()`` (Redis pub/sub spans every
database of a server: the number keeps a registry from waking, or handing its record to, a waiter
of another database's registry); ``tq:states`` lists the states seen.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis

from celery_tq.registry.kvlist import by_score, scored
from celery_tq.registry.record import FINAL, FIRST_WAIT, WAKE_ROW_MAX, Query, Row, fold

__all__ = ["RedisStore"]

_INDEXES = """
local function indexes(prefix, r)
  local keys = {[prefix .. 'i:all'] = true}
  for _, f in ipairs({'state', 'name', 'queue', 'priority'}) do
    if r[f] then keys[prefix .. 'i:' .. f .. ':' .. r[f]] = true end
  end
  -- a task is not indexed under its own id as root (most tasks): queries add the root itself
  if r['root_id'] and r['root_id'] ~= r['id'] then keys[prefix .. 'i:root_id:' .. r['root_id']] = true end
  if r['tags'] then
    local ok, tags = pcall(cjson.decode, r['tags'])
    if ok and type(tags) == 'table' then
      for _, t in ipairs(tags) do keys[prefix .. 'i:tag:' .. tostring(t)] = true end
    end
  end
  return keys
end
local function load(key)
  local flat = redis.call('HGETALL', key)
  local row = {}
  for i = 1, #flat, 2 do row[flat[i]] = flat[i + 1] end
  return row, #flat == 0
end
"""

_MERGE = (
    _INDEXES
    + """
local key, prefix, id = KEYS[1], ARGV[1], ARGV[2]
local final = tonumber(ARGV[3])
local new = cjson.decode(ARGV[4])  -- the write: one JSON object of strings
local old, fresh = load(key)
local row = {}
if fresh then
  for f, v in pairs(new) do row[f] = v end
else
  local np, op = tonumber(new['progress']), tonumber(old['progress']) or -1
  local newer = np > op or (np == op and np < final)
  for _, f in ipairs({'state', 'progress', 'result', 'error', 'finished_at', 'runtime', 'retries', 'meta'}) do
    if newer then row[f] = new[f] else row[f] = old[f] end
  end
  for _, f in ipairs({'name', 'priority', 'tags', 'queue', 'args_repr', 'kwargs_repr',
                      'parent_id', 'root_id', 'group_id'}) do
    local a, b = old[f], new[f]
    if newer then a, b = b, a end
    if a ~= nil then row[f] = a else row[f] = b end
  end
  local later = (tonumber(new['retries']) or 0) - (tonumber(old['retries']) or 0)
  for _, f in ipairs({'worker', 'started_at'}) do
    if newer then
      if new[f] == nil and later <= 0 then row[f] = old[f] else row[f] = new[f] end
    else
      if old[f] ~= nil or later ~= 0 then row[f] = old[f] else row[f] = new[f] end
    end
  end
  -- record.merge_deliveries: a write without a run keeps the count, a run counted last is not
  -- counted again, any other run adds its runs
  if new['run_id'] == nil then
    row['deliveries'], row['run_id'] = old['deliveries'], old['run_id']
  else
    local od, nd = tonumber(old['deliveries']) or 0, tonumber(new['deliveries']) or 0
    if old['run_id'] == new['run_id'] then row['deliveries'] = tostring(math.max(od, nd))
    else row['deliveries'] = tostring(od + nd) end
    row['run_id'] = new['run_id']
  end
  local s1, s2 = tonumber(old['submitted_at']), tonumber(new['submitted_at'])
  if s1 and s2 then
    if s1 <= s2 then row['submitted_at'] = old['submitted_at']
    else row['submitted_at'] = new['submitted_at'] end
  else
    row['submitted_at'] = old['submitted_at'] or new['submitted_at']
  end
end
row['id'] = id
if row['runtime'] == nil and row['finished_at'] and row['started_at'] then
  local r = tonumber(row['finished_at']) - tonumber(row['started_at'])
  if r >= 0 then row['runtime'] = string.format('%.6f', r) end
end
local before = {}
if not fresh then before = indexes(prefix, old) end
local after = indexes(prefix, row)
local score = row['submitted_at'] or '0'
local moved = fresh or old['submitted_at'] ~= row['submitted_at']
for k in pairs(before) do if not after[k] then redis.call('ZREM', k, id) end end
for k in pairs(after) do if moved or not before[k] then redis.call('ZADD', k, score, id) end end
local gone = {}
for f in pairs(old) do if row[f] == nil then table.insert(gone, f) end end
if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
local flat = {}  -- the fields that changed (a task's outcome leaves most of its row as it was)
for f, v in pairs(row) do if old[f] ~= v then table.insert(flat, f); table.insert(flat, v) end end
if #flat > 0 then redis.call('HSET', key, unpack(flat)) end
redis.call('SADD', prefix .. 'states', row['state'])
if tonumber(new['progress']) >= final then  -- wakes a client waiting in get()
  local channel, payload = ARGV[6] .. id, row['state']
  if redis.call('PUBSUB', 'NUMSUB', channel)[2] > 0 then  -- someone waits: the row, if small
    local whole = cjson.encode(row)
    if #whole <= tonumber(ARGV[5]) then payload = whole end
  end
  redis.call('PUBLISH', channel, payload)
end
return 1
"""
)

_DELETE = (
    _INDEXES
    + """
local old, fresh = load(KEYS[1])
for k in pairs(indexes(ARGV[1], old)) do redis.call('ZREM', k, ARGV[2]) end
redis.call('ZREM', ARGV[1] .. 'i:all', ARGV[2])
redis.call('DEL', KEYS[1])
return 1
"""
)

# kv_release: if the claim still holds the token, delete the chord's keys and mark the claim.
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if #KEYS > 1 then redis.call('DEL', unpack(KEYS, 2)) end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"""

_INTS = ("priority", "progress", "retries", "deliveries")
_FLOATS = ("submitted_at", "started_at", "finished_at", "runtime")


class RedisStore:
    """Records in Redis (the same database as the tq result backend's)."""

    prefix = "tq:"

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: Any = redis.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=10
        )
        self._merge: Any = self.client.register_script(_MERGE)
        self._delete = self.client.register_script(_DELETE)
        self._release = self.client.register_script(_RELEASE)
        self._pubsub: Any = None  # opened by the first wait in get()
        db = self.client.connection_pool.connection_kwargs.get("db") or 0
        self._channels = f"{self.prefix}{db}:done:"  # + task id: the wake-up channel of a task
        self._expected: str | None = None  # sent by this process, subscribed to, not waited for yet
        self._seen_done: dict[str, bytes] = {}  # task id: the payload of its wake-up
        self._wait_lock = threading.Lock()

    def published(self, task_id: str) -> None:
        """``task_id`` was just sent by this process. If it has waited in ``get()`` before (its
        listening connection is open and free) and waits for what it sends (no task it sent
        earlier is still subscribed to), subscribe to the task's outcome now, without waiting
        for Redis's answer: a short task's ``get()`` then takes its record from the wake-up and
        reads nothing. At most one task is subscribed to ahead: a process that sends many tasks
        without waiting pays nothing per task."""
        pubsub = self._pubsub
        if pubsub is None or self._expected is not None or not self._wait_lock.acquire(blocking=False):
            return  # never waited here, a task sent before is not waited for yet, or a wait is on
        try:
            if self._expected is None:
                pubsub.subscribe(self._done(task_id))
                self._expected = task_id
        except (redis.ConnectionError, redis.TimeoutError):
            self._drop_listener()
        finally:
            self._wait_lock.release()

    def wait_for_outcome(self, task_id: str, seconds: float, is_ready: Callable[[str], bool]) -> bool:
        """Return when ``task_id``'s terminal state is written (the merge script publishes it on
        ``tq:<db>:done:<id>``, with the merged row when it is small) or after ``seconds``.

        A task subscribed to when it was sent (:meth:`published`) is first waited for up to
        ``FIRST_WAIT`` s without a read. Otherwise, and if that wait runs out, the store
        subscribes and then calls ``is_ready`` (it reads the record), which closes the race
        with the outcome's write. A wait ends the subscription made ahead for another task."""
        channel = self._done(task_id)
        with self._wait_lock:
            if self._pubsub is None:
                self._pubsub = self.client.pubsub()
            pubsub = self._pubsub
            try:
                ahead, self._expected = self._expected, None
                try:
                    if ahead == task_id:
                        if self._take(pubsub, task_id, min(seconds, FIRST_WAIT)):
                            return True
                    else:
                        if ahead is not None:
                            pubsub.unsubscribe(self._done(ahead))
                        self._seen_done.pop(task_id, None)  # woken before this wait: a read is fresher
                        pubsub.subscribe(channel)
                    if is_ready(task_id):
                        return True
                    self._take(pubsub, task_id, seconds)
                finally:
                    pubsub.unsubscribe(channel)
            except (redis.ConnectionError, redis.TimeoutError):
                # the caller polls again (through the backend's retries); a new connection next time
                self._drop_listener()
                time.sleep(min(seconds, 0.1))
        return True

    def notified_row(self, task_id: str) -> Row | None:
        """The merged row the wake-up for ``task_id`` carried (taken once), or None: read it."""
        with self._wait_lock:
            payload = self._seen_done.pop(task_id, None)
        if not payload or not payload.startswith(b"{"):
            return None  # a bare state: the row was too big, or written by an earlier release
        try:
            fields = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        if not isinstance(fields, dict) or fields.get("id") != task_id or "state" not in fields:
            return None
        if not all(isinstance(v, str) for v in fields.values()):
            return None
        return _typed(fields)

    def _done(self, task_id: str) -> str:
        return f"{self._channels}{task_id}"

    def _take(self, pubsub: Any, task_id: str, seconds: float) -> bool:
        """Read wake-ups until ``task_id``'s (True; kept for :meth:`notified_row`) or until
        ``seconds`` pass; those of tasks nobody waits for any more are dropped."""
        deadline, start = time.monotonic() + seconds, len(self._channels.encode())
        while (remaining := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=remaining)
            if (
                message is not None
                and message.get("type") == "message"
                and bytes(message["channel"])[start:].decode(errors="replace") == task_id
            ):
                self._seen_done[task_id] = bytes(message["data"])
                if len(self._seen_done) > 64:  # woken, never asked for its row
                    del self._seen_done[next(iter(self._seen_done))]
                return True
        return False

    def _drop_listener(self) -> None:
        """Close a listening connection that failed; the next use opens a new one."""
        pubsub, self._pubsub = self._pubsub, self.client.pubsub()  # connects when first used
        self._expected = None  # subscribed on the connection that is gone
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    @property
    def batches_outcomes(self) -> bool:
        """Whether a worker's main process can write its pool's outcomes on its event loop
        (:mod:`celery_tq.registry.redis_async`: plain TCP, not TLS)."""
        return self.client.connection_pool.connection_class is redis.Connection

    merge_script = _MERGE

    @property
    def merge_sha(self) -> str:
        """The SHA1 under which Redis knows the merge script (``EVALSHA``)."""
        return str(self._merge.sha)

    def key(self, task_id: str) -> str:
        """The hash that holds ``task_id``'s record."""
        return f"{self.prefix}t:{task_id}"

    def write(self, changes: Sequence[Row]) -> None:
        folded = fold(changes)  # one script call per task: a short task's STARTED rides with its outcome
        if len(folded) == 1:  # one EVALSHA round trip
            (change,) = folded.values()
            self._merge(keys=[self.key(change["id"])], args=self._args(change))
            return
        # EVALSHA in a plain pipeline: redis-py's script pipelines send SCRIPT EXISTS first each time
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for change in folded.values():
                pipe.evalsha(self._merge.sha, 1, self.key(change["id"]), *self._args(change))
            try:
                pipe.execute()
                return
            except redis.exceptions.NoScriptError:  # a restarted or flushed server
                if attempt == 2:
                    raise
                self.client.script_load(_MERGE)

    def _args(self, change: Row) -> list[Any]:
        """The script's arguments: the write as ONE JSON object whose values are all strings (as
        the hash keeps them; ``repr`` keeps a float's every digit), which the script decodes in
        C: packing a field and a value per argument cost the writer more than the script ran."""
        fields = {
            field: value if isinstance(value, str) else repr(value)
            for field, value in change.items()
            if field != "id" and value is not None
        }
        return [
            self.prefix,
            change["id"],
            FINAL,
            json.dumps(fields, ensure_ascii=False, separators=(",", ":")),
            WAKE_ROW_MAX,
            self._channels,
        ]

    def script_args(self, change: Row) -> list[bytes]:
        """The merge script's arguments for ``change``, as they go on the wire."""
        return [str(arg).encode() for arg in self._args(change)]

    def read(self, task_ids: Sequence[str]) -> list[Row | None]:
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hgetall(self.key(task_id))
        return [_decode(raw) if raw else None for raw in pipe.execute()]

    def _index_keys(self, query: Query, state: str | None) -> list[str]:
        keys = [f"{self.prefix}i:tag:{t}" for t in sorted(query.tags)]
        for field in ("name", "queue", "priority", "root_id"):
            if getattr(query, field) is not None:
                keys.append(f"{self.prefix}i:{field}:{getattr(query, field)}")
        if state is not None:
            keys.append(f"{self.prefix}i:state:{state}")
        return keys or [f"{self.prefix}i:all"]

    def query(self, query: Query) -> list[Row]:
        keys = self._index_keys(query, query.state)
        low, high = _bounds(query)
        pipe = self.client.pipeline(transaction=True)
        source = keys[0]
        if len(keys) > 1:
            source = f"{self.prefix}tmp:{uuid.uuid4().hex}"
            pipe.zinterstore(source, keys, aggregate="MIN")
        if query.oldest_first:
            pipe.zrangebyscore(source, low, high, start=0, num=query.limit)
        else:
            pipe.zrevrangebyscore(source, high, low, start=0, num=query.limit)
        if len(keys) > 1:
            pipe.delete(source)
        ids = pipe.execute()[1 if len(keys) > 1 else 0]
        rows = [r for r in self.read([i.decode() for i in ids]) if r is not None]
        root = self._root_row(query)
        if root is not None and root["id"] not in {r["id"] for r in rows}:
            rows.append(root)
            rows.sort(key=lambda r: float(r.get("submitted_at") or 0.0), reverse=not query.oldest_first)
            del rows[query.limit :]
        return rows

    def _root_row(self, query: Query) -> Row | None:
        """The root task of a ``root_id`` query, which its own index does not list."""
        if query.root_id is None:
            return None
        row = self.read([query.root_id])[0]
        return row if row is not None and query.matches(row) else None

    def counts(self, query: Query) -> dict[str, int]:
        low, high = _bounds(query)
        states = (
            [query.state]
            if query.state
            else sorted(m.decode() for m in self.client.smembers(f"{self.prefix}states"))
        )
        pipe = self.client.pipeline(transaction=True)
        temporary, positions, position = [], [], 0
        for state in states:
            keys = self._index_keys(query, state)
            source = keys[0]
            if len(keys) > 1:
                source = f"{self.prefix}tmp:{uuid.uuid4().hex}"
                temporary.append(source)
                pipe.zinterstore(source, keys, aggregate="MIN")
                position += 1
            pipe.zcount(source, low, high)
            positions.append(position)
            position += 1
        if temporary:
            pipe.delete(*temporary)
        results = pipe.execute()
        counted = {s: int(results[p]) for s, p in zip(states, positions, strict=True)}
        root = self._root_row(query)
        if root is not None:
            counted[root["state"]] = counted.get(root["state"], 0) + 1
        return {s: n for s, n in counted.items() if n}

    def delete(self, task_id: str) -> None:
        self._delete(keys=[self.key(task_id)], args=[self.prefix, task_id])
        if self._expected == task_id and self._wait_lock.acquire(blocking=False):  # forget(): nobody waits
            try:
                if self._expected == task_id and self._pubsub is not None:
                    self._expected = None
                    self._pubsub.unsubscribe(self._done(task_id))
            except (redis.ConnectionError, redis.TimeoutError):
                self._drop_listener()
            finally:
                self._wait_lock.release()

    def purge(self, before: float) -> int:
        purged = 0
        while True:
            ids = self.client.zrangebyscore(f"{self.prefix}i:all", "-inf", f"({before}", start=0, num=500)
            if not ids:
                return purged
            pipe = self.client.pipeline(transaction=False)
            for raw in ids:
                task_id = raw.decode()
                self._delete(keys=[self.key(task_id)], args=[self.prefix, task_id], client=pipe)
            pipe.execute()
            purged += len(ids)

    def _kv(self, key: str) -> str:
        return f"{self.prefix}kv:{key}"

    def kv_get(self, keys: Sequence[str]) -> list[bytes | None]:
        return list(self.client.mget([self._kv(k) for k in keys]))

    def kv_set(self, key: str, value: bytes, ttl: float | None) -> None:
        self.client.set(self._kv(key), value, px=int(ttl * 1000) if ttl else None)

    def kv_delete(self, key: str) -> None:
        self.client.delete(self._kv(key))

    def kv_incr(self, key: str, ttl: float | None) -> int:
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(self._kv(key))
        if ttl:
            pipe.pexpire(self._kv(key), int(ttl * 1000))
        return int(pipe.execute()[0])

    def kv_expire(self, key: str, ttl: float | None) -> None:
        if ttl:
            self.client.pexpire(self._kv(key), int(ttl * 1000))
        else:
            self.client.persist(self._kv(key))

    def kv_claim(self, key: str, token: bytes, ttl: float) -> bool:
        return bool(self.client.set(self._kv(key), token, px=max(1, int(ttl * 1000)), nx=True))

    def kv_release(
        self, key: str, token: bytes, drop: Sequence[str], value: bytes, ttl: float | None
    ) -> bool:
        keys = [self._kv(key), *(self._kv(name) for name in drop)]
        return bool(self._release(keys=keys, args=[token, value, int(ttl * 1000) if ttl else 0]))

    def kv_push(self, key: str, member: str, score: float, value: bytes, ttl: float | None) -> int:
        # A hash of member -> score and value: HSETNX keeps the first value of a member.
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(self._kv(key), member, scored(score, value))
        pipe.hlen(self._kv(key))
        if ttl:
            pipe.pexpire(self._kv(key), int(ttl * 1000))
        return int(pipe.execute()[1])

    def kv_list(self, key: str) -> list[bytes]:
        return by_score(self.client.hvals(self._kv(key)))


def _bounds(query: Query) -> tuple[str, str]:
    low = "-inf" if query.since is None else repr(query.since)
    high = "+inf" if query.until is None else repr(query.until)
    return low, high


def _decode(raw: dict[bytes, bytes]) -> Row:
    return _typed({k.decode(): v.decode(errors="replace") for k, v in raw.items()})


def _typed(row: Row) -> Row:
    """A row of the hash's strings with its numbers as numbers (as :meth:`RedisStore.read` gives)."""
    for field, kind in [*((f, int) for f in _INTS), *((f, float) for f in _FLOATS)]:
        if field in row:
            with contextlib.suppress(ValueError):  # else left as text: to_record names it corrupt
                row[field] = kind(row[field])
    return row
