-- uses whole.lua
-- What a hello that names a session reads: whether it is whole, and its owner; renews
-- its TTLs. Its size (history, memory, stream) does not change the cost.
-- KEYS: state, memory, history, meta, stream, msgids. ARGV: TTL (ms).
-- Returns {0} if there is no such session, {-1} if it was lost (what was left is now
-- deleted), else {1, owner or false}.
local found = whole(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
if found ~= 1 then
  return {found}
end
local head = redis.call('HMGET', KEYS[4], 'owner', 's', 'm')
if not (head[1] or head[2] or head[3]) then
  return {0}
end
for i = 1, 6 do
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return {1, head[1]}
