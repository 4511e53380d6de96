-- Extend the lock's lease only if it still holds our token.
-- KEYS: lock. ARGV: token, lease (ms).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
