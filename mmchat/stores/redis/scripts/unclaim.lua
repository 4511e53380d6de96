-- Forget a claimed client message id (and a cancel of it), so the client may retry it.
-- KEYS: msgids, old msgids, meta, cancel. ARGV: message id.
-- `meta` stops saying the session has message ids once none is left (see whole.lua).
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[4], 'm:' .. ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HDEL', KEYS[3], 'i')
end
return 1
