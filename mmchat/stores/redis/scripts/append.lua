-- uses stream.lua
-- Append a held turn's reply events, if its fencing token is still the session's, and
-- say whether its reply was cancelled.
-- KEYS: meta, stream, cancel. ARGV: fencing token, TTL (ms), stream length kept,
-- number of entries, then per entry: id, response id, kind, text, data ('' for none);
-- then the cancel members that mean this turn.
-- Returns {0} when the token is stale (nothing written), else {1, cancelled}.
-- A refused entry id fails the script at the first entry, before anything is written.
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then
  return {0}
end
local n = tonumber(ARGV[4])
add_entries(KEYS[2], ARGV[3], 5, n)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'q', 1)
local cancelled = 0
for i = 5 + 5 * n, #ARGV do
  if redis.call('SISMEMBER', KEYS[3], ARGV[i]) == 1 then
    cancelled = 1
  end
end
return {1, cancelled}
