-- Record a cancel. KEYS: cancel, lock. ARGV: TTL (ms)[, message id]. Without a message
-- id, the turn holding the lock now is meant (by its token); returns 0 if there is none.
local member
if #ARGV > 1 then
  member = 'm:' .. ARGV[2]
else
  local token = redis.call('GET', KEYS[2])
  if not token then
    return 0
  end
  member = 'l:' .. token
end
redis.call('SADD', KEYS[1], member)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
