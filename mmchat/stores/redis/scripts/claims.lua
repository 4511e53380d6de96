-- Client message ids taken in a session, so a retried message runs once (the loader
-- puts this file before the scripts that claim them).
--
-- The ids live in two generations of sets: `ids` takes new ones; once it holds more
-- than `cap`, it becomes `old` (replacing the generation before) and a new `ids`
-- starts. So the newest `cap` ids at least, and never more than 2 * cap + 1, are kept,
-- however long the session runs.

-- 1 if `id` was not taken before (it is now), else 0.
local function claim(ids, old, id, cap, ttl)
  if redis.call('SISMEMBER', old, id) == 1 or redis.call('SADD', ids, id) == 0 then
    return 0
  end
  if redis.call('SCARD', ids) > tonumber(cap) then
    redis.call('RENAME', ids, old)
    redis.call('PEXPIRE', old, ttl)
    redis.call('SADD', ids, id)
  end
  redis.call('PEXPIRE', ids, ttl)
  return 1
end
