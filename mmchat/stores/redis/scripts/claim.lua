-- uses claims.lua
-- Claim a client message id (see claims.lua) and record in `meta` that the session has
-- message ids. KEYS: msgids, old msgids, meta. ARGV: message id, ids kept, TTL (ms).
-- Returns 1 if the id was not taken before, else 0.
local claimed = claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])
if claimed == 1 then
  redis.call('HSET', KEYS[3], 'i', 1)
end
return claimed
