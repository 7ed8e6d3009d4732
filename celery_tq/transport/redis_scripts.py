"""Lua scripts of the ``tq+redis://`` transport (see :mod:`celery_tq.transport.redis`).

Every key is built from ``P`` (the ``global_keyprefix``) plus a logical name. Queue keys are
kombu's (``queue`` and ``queue<sep><step>``); the transport's own keys live under ``_tq.``:

* ``_tq.proc.<cid>|<src>``  list: messages consumer ``cid`` moved out of queue key ``src``
* ``_tq.srcs.<cid>``        set: the ``src`` keys ``cid`` has processing lists for
* ``_tq.hb.<cid>``          string with a TTL: ``cid`` is alive while it exists
* ``_tq.consumers``         set: every ``cid`` that may own processing lists
* ``_tq.wake.<queue>``      sorted set with one member: "``queue`` may have messages"

Queues are lists pushed on the left (LPUSH) and consumed from the right, so the FRONT of a
queue is its right end: redelivered messages are RPUSHed there. A redelivered message gets a
leading ``"redelivered": true`` key in its JSON envelope, which the consumer turns into
``delivery_info['redelivered']`` (the top-level key is what kombu's own virtual restore adds).
"""

from __future__ import annotations

__all__ = ["ADOPT", "FETCH", "PROC_PREFIX", "RECOVER", "RESTORE"]

PROC_PREFIX = "_tq.proc."  # + "<cid>|<src>": a consumer's processing list (read by celery_tq.recovery.scan)

_COMMON = """
local P = ARGV[1]
local function mark(v)
  if string.sub(v, 1, 1) == '{' and string.len(v) > 2
      and string.sub(v, 1, 21) ~= '{"redelivered": true,' then
    return '{"redelivered": true, ' .. string.sub(v, 2)
  end
  return v
end
local function wake_for(src, sep)
  local at = string.find(src, sep, 1, true)
  local queue = src
  if at then queue = string.sub(src, 1, at - 1) end
  redis.call('ZADD', P .. '_tq.wake.' .. queue, 0, 'w')
end
-- Applies n acks, (src, raw) pairs from ARGV[i]; returns the index after them.
local function apply_acks(procp, i, n)
  for _ = 1, n do
    redis.call('LREM', procp .. ARGV[i], 1, ARGV[i + 1])
    i = i + 2
  end
  return i
end
"""

#: ARGV: P, cid, ttl_ms, n, nacks, nqueues, nsteps, then nacks (src, raw) pairs, then the
#: nqueues queue names, then nsteps*nqueues source keys (step-major, queues in the rotated
#: order). Applies the acks, refreshes the heartbeat, moves up to n messages (highest step
#: first, round-robin between queues inside a step, FIFO inside a key) into this consumer's
#: processing lists and returns them as a flat list src1, raw1, src2, raw2, ...
#: Wake markers: removed when every key was drained, re-armed for queues still non-empty.
FETCH = (
    _COMMON
    + """
local cid = ARGV[2]
local ttl, n = tonumber(ARGV[3]), tonumber(ARGV[4])
local nacks, nq, ns = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local procp = P .. '_tq.proc.' .. cid .. '|'
local i = apply_acks(procp, 8, nacks)
local queues = {}
for q = 1, nq do queues[q] = ARGV[i]; i = i + 1 end
local base = i
local out, moved, seen = {}, 0, {}
if n > 0 and nq > 0 then
  redis.call('SET', P .. '_tq.hb.' .. cid, '1', 'PX', ttl)
  redis.call('SADD', P .. '_tq.consumers', cid)
  local srcs = P .. '_tq.srcs.' .. cid
  for s = 0, ns - 1 do
    local live = {}
    for q = 1, nq do live[q] = ARGV[base + s * nq + q - 1] end
    local any = true
    while any and moved < n do
      any = false
      for q = 1, nq do
        local k = live[q]
        if k and moved < n then
          if not seen[k] then redis.call('SADD', srcs, k); seen[k] = true end
          local v = redis.call('LMOVE', P .. k, procp .. k, 'RIGHT', 'LEFT')
          if v then
            out[#out + 1] = k; out[#out + 1] = v
            moved = moved + 1; any = true
          else
            live[q] = false
          end
        end
      end
    end
    if moved >= n then break end
  end
  for q = 1, nq do
    local wake = P .. '_tq.wake.' .. queues[q]
    local left = false
    if moved >= n then
      for s = 0, ns - 1 do
        if redis.call('EXISTS', P .. ARGV[base + s * nq + q - 1]) == 1 then left = true; break end
      end
    end
    if left then redis.call('ZADD', wake, 0, 'w') else redis.call('DEL', wake) end
  end
end
return out
"""
)

#: ARGV: P, cid, sep, then (src, raw) pairs, newest first. Puts each message still in the
#: processing list back at the FRONT of its queue key, marked redelivered (only if still
#: listed, so a message is never restored twice). Returns how many were restored.
RESTORE = (
    _COMMON
    + """
local procp = P .. '_tq.proc.' .. ARGV[2] .. '|'
local sep = ARGV[3]
local restored = 0
for i = 4, #ARGV, 2 do
  local src, raw = ARGV[i], ARGV[i + 1]
  if redis.call('LREM', procp .. src, 1, raw) > 0 then
    redis.call('RPUSH', P .. src, mark(raw))
    wake_for(src, sep)
    restored = restored + 1
  end
end
return restored
"""
)

#: ARGV: P, sep, limit. For each registered consumer whose heartbeat key is gone, moves its
#: processing lists back to the FRONT of their queues (oldest message frontmost), marked
#: redelivered, at most ``limit`` messages per run; forgets a consumer once it owns nothing.
#: Returns the number of messages moved.
RECOVER = (
    _COMMON
    + """
local sep, limit = ARGV[2], tonumber(ARGV[3])
local cset = P .. '_tq.consumers'
local moved = 0
for _, cid in ipairs(redis.call('SMEMBERS', cset)) do
  if moved >= limit then break end
  if redis.call('EXISTS', P .. '_tq.hb.' .. cid) == 0 then
    local sset = P .. '_tq.srcs.' .. cid
    local done = true
    for _, src in ipairs(redis.call('SMEMBERS', sset)) do
      local proc = P .. '_tq.proc.' .. cid .. '|' .. src
      local any = false
      while moved < limit do
        local v = redis.call('LPOP', proc)
        if not v then break end
        redis.call('RPUSH', P .. src, mark(v))
        moved = moved + 1; any = true
      end
      if any then wake_for(src, sep) end
      if redis.call('EXISTS', proc) == 1 then done = false; break end
      redis.call('SREM', sset, src)
    end
    if done then
      redis.call('SREM', cset, cid)
      redis.call('DEL', sset)
    end
  end
end
return moved
"""
)

#: ARGV: P, old cid, new cid ('' to only release), ttl_ms, sep, nacks, then nacks (src, raw)
#: pairs (acked: dropped), then (src, raw) pairs still held by the process (moved to the new
#: consumer's lists). Everything else in the old consumer's lists goes back to the FRONT of
#: its queue, marked redelivered; the old consumer is then forgotten. Used after a reconnect
#: (a fetch whose reply was lost left messages nobody holds) and on close.
ADOPT = (
    _COMMON
    + """
local old, new = ARGV[2], ARGV[3]
local ttl, sep, nacks = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local oldp = P .. '_tq.proc.' .. old .. '|'
local newp = P .. '_tq.proc.' .. new .. '|'
local i = apply_acks(oldp, 7, nacks)
if new ~= '' then
  redis.call('SET', P .. '_tq.hb.' .. new, '1', 'PX', ttl)
  redis.call('SADD', P .. '_tq.consumers', new)
end
local kept = 0
while i <= #ARGV do
  local src, raw = ARGV[i], ARGV[i + 1]
  if new ~= '' and redis.call('LREM', oldp .. src, 1, raw) > 0 then
    redis.call('RPUSH', newp .. src, raw)
    redis.call('SADD', P .. '_tq.srcs.' .. new, src)
    kept = kept + 1
  end
  i = i + 2
end
local sset = P .. '_tq.srcs.' .. old
local restored = 0
for _, src in ipairs(redis.call('SMEMBERS', sset)) do
  local proc = oldp .. src
  local any = false
  while true do
    local v = redis.call('LPOP', proc)
    if not v then break end
    redis.call('RPUSH', P .. src, mark(v))
    restored = restored + 1; any = true
  end
  if any then wake_for(src, sep) end
end
redis.call('DEL', sset, P .. '_tq.hb.' .. old)
redis.call('SREM', P .. '_tq.consumers', old)
return {kept, restored}
"""
)
