-- Erase a session if `owner` owns it, counting what goes.
-- KEYS: state, memory, history, meta, stream, msgids, old msgids, cancel. ARGV: owner.
-- Returns {0} if the session is gone or another owner's (nothing is touched), else
-- {1, history entries, memory entries, stream events, message ids} (now deleted).
if redis.call('HGET', KEYS[4], 'owner') ~= ARGV[1] then
  return {0}
end
local counts = {1, redis.call('LLEN', KEYS[3]), redis.call('LLEN', KEYS[2]),
                redis.call('XLEN', KEYS[5]),
                redis.call('SCARD', KEYS[6]) + redis.call('SCARD', KEYS[7])}
redis.call('DEL', unpack(KEYS))
return counts
