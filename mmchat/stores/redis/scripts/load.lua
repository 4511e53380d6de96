-- uses whole.lua
-- Read a whole session (for the embedded API's history, say), renewing its TTLs.
-- KEYS: state, memory, history, meta, stream, msgids. ARGV: TTL (ms).
-- Returns {-1} if it was lost (what was left is now deleted), else
-- {1, state, memory entries, history entries, owner}.
if whole(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]) == -1 then
  return {-1}
end
for i = 1, 6 do
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return {1, redis.call('GET', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1),
        redis.call('LRANGE', KEYS[3], 0, -1), redis.call('HGET', KEYS[4], 'owner')}
