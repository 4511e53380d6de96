-- uses queue.lua
-- uses whole.lua
-- uses claims.lua
-- Begin a turn: check the owner, claim the message id, take the lock (or queue for it)
-- and read what the turn needs.
-- KEYS: lock, msgids, state, memory, stream, history, meta, cancel, queue, waiters,
--       old msgids.
-- ARGV: token, lease (ms), TTL (ms), owner ('' for any), place kept (ms), wake prefix
--       [, message id to claim, message ids kept (see claims.lua)].
-- Returns {5} if the session was lost (part of it missing: what was left is deleted),
-- {3} if an owner is given and the session is gone, {4} if it is someone
-- else's (nothing claimed, nothing queued), {0} if the message id was taken before,
-- {1, place in the queue, ms left of the holder's lease} if the lock is busy (the id,
-- if any, is claimed all the same), else {2, state, memory, stream tail, whether a
-- cancel of the message was asked for, fencing token}.
if whole(KEYS[3], KEYS[4], KEYS[6], KEYS[7], KEYS[5], KEYS[2]) == -1 then
  return {5}
end
if ARGV[4] ~= '' then
  local owner = redis.call('HGET', KEYS[7], 'owner')
  if not owner then
    return {3}
  end
  if owner ~= ARGV[4] then
    return {4}
  end
end
if #ARGV > 6 then
  if claim(KEYS[2], KEYS[11], ARGV[7], ARGV[8], ARGV[3]) == 0 then
    return {0}
  end
  redis.call('HSET', KEYS[7], 'i', 1)
end
local taken = take(KEYS[1], KEYS[9], KEYS[10], KEYS[7], ARGV[1], ARGV[2], ARGV[5], ARGV[3],
                   ARGV[6])
if taken[1] == 0 then
  return {1, taken[2], taken[3]}
end
for i = 2, 7 do
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
local cancelled = 0
if #ARGV > 6 then
  cancelled = redis.call('SISMEMBER', KEYS[8], 'm:' .. ARGV[7])
end
return {2, redis.call('GET', KEYS[3]), redis.call('LRANGE', KEYS[4], 0, -1),
        redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1), cancelled, taken[2]}
