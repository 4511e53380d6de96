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
for i = 0, n - 1 do
  local at = 5 + 5 * i
  if ARGV[at + 4] == '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], ARGV[at],
               'r', ARGV[at + 1], 'k', ARGV[at + 2], 't', ARGV[at + 3])
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], ARGV[at],
               'r', ARGV[at + 1], 'k', ARGV[at + 2], 't', ARGV[at + 3], 'd', ARGV[at + 4])
  end
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'q', 1)
local cancelled = 0
for i = 5 + 5 * n, #ARGV do
  if redis.call('SISMEMBER', KEYS[3], ARGV[i]) == 1 then
    cancelled = 1
  end
end
return {1, cancelled}
