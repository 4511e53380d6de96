-- uses queue.lua
-- uses whole.lua
-- uses stream.lua
-- End a held turn in one step: if its fencing token is still the session's, save its
-- write and append its last reply events; forget its cancels; release the lock (if it
-- still holds the turn's token) and wake the next waiter. A stale turn writes nothing,
-- nor does a turn of a session that lost a part meanwhile (what is left is deleted).
-- KEYS: meta, stream, cancel, lock, queue, waiters, state, memory, history, msgids.
-- ARGV: fencing token, lock token, TTL (ms), stream length kept, wake prefix,
--       history entries kept,
--       whether there is a write (1/0), state, memory kept, number of memory entries,
--       the entries, number of turns, the turns (JSON), number of stream entries, the
--       entries (5 values each, as in append.lua), then the cancel members.
-- Returns {1 if written (0: stale), 1 if the lock was released, 1 if the stream
-- refused the entries (their first seq does not follow its last: the rest is done)}.
local fresh = redis.call('HGET', KEYS[1], 'fence') == ARGV[1]
  and whole(KEYS[7], KEYS[8], KEYS[9], KEYS[1], KEYS[2], KEYS[10]) == 1
local ttl = ARGV[3]
local at = 7
local has_write = ARGV[at] == '1'
local state, max_memory = ARGV[at + 1], tonumber(ARGV[at + 2])
local n_memory = tonumber(ARGV[at + 3])
local memory_at = at + 4
at = memory_at + n_memory
local n_turns = tonumber(ARGV[at])
local turns_at = at + 1
at = turns_at + n_turns
local n_entries = tonumber(ARGV[at])
local entries_at = at + 1
local cancels_at = entries_at + 5 * n_entries
local refused = 0
if fresh and n_entries > 0 then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  local first = tonumber(string.match(ARGV[entries_at], '^(%d+)'))
  if last and first <= tonumber(string.match(last[1], '^(%d+)')) then
    refused, n_entries = 1, 0
  end
end
if fresh then
  if has_write then
    redis.call('SET', KEYS[7], state, 'PX', ttl)
    for i = memory_at, memory_at + n_memory - 1 do
      redis.call('RPUSH', KEYS[8], ARGV[i])
    end
    if max_memory > 0 then
      redis.call('LTRIM', KEYS[8], -max_memory, -1)
    else
      redis.call('DEL', KEYS[8])
    end
    for i = turns_at, turns_at + n_turns - 1 do
      redis.call('RPUSH', KEYS[9], ARGV[i])
    end
    redis.call('LTRIM', KEYS[9], -tonumber(ARGV[6]), -1)
    redis.call('HSET', KEYS[1], 's', 1)
    if redis.call('EXISTS', KEYS[8]) == 1 then
      redis.call('HSET', KEYS[1], 'm', 1)
    else
      redis.call('HDEL', KEYS[1], 'm')
    end
    if redis.call('EXISTS', KEYS[9]) == 1 then
      redis.call('HSET', KEYS[1], 'y', 1)
    end
    for _, key in ipairs({KEYS[8], KEYS[9], KEYS[1], KEYS[2], KEYS[10]}) do
      redis.call('PEXPIRE', key, ttl)
    end
  end
  add_entries(KEYS[2], ARGV[4], entries_at, n_entries)
  if n_entries > 0 then
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('HSET', KEYS[1], 'q', 1)
  end
end
if cancels_at <= #ARGV then
  redis.call('SREM', KEYS[3], unpack(ARGV, cancels_at, #ARGV))
end
return {fresh and 1 or 0, release(KEYS[4], KEYS[5], KEYS[6], ARGV[2], ARGV[5]), refused}
