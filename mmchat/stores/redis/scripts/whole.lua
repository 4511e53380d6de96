-- A session is whole or it is gone (the loader puts this file before the scripts that
-- read or write a session).
--
-- `meta` records which parts a session has (each a flag, set by the write that makes
-- the part): `s` state, `y` history, `m` memory, `q` stream, `i` message ids. A part
-- that a flag names but that is missing (evicted by an LRU policy, or a restart between
-- writes), or parts without their `meta`, mean the session was lost: what is left of it
-- is deleted, so it is never served as the same session (its seqs never restart).

-- 1 if the session is whole, 0 if none of it exists, -1 if it was lost (now deleted).
local function whole(state, memory, history, meta, stream, msgids)
  local lost
  if redis.call('EXISTS', meta) == 0 then
    lost = redis.call('EXISTS', state, memory, history, stream, msgids) > 0
    if not lost then
      return 0
    end
  else
    local parts = {state, history, memory, stream, msgids}
    local flags = redis.call('HMGET', meta, 's', 'y', 'm', 'q', 'i')
    lost = false
    for i = 1, 5 do
      if flags[i] and redis.call('EXISTS', parts[i]) == 0 then
        lost = true
        break
      end
    end
  end
  if lost then
    redis.call('DEL', state, memory, history, meta, stream, msgids)
    return -1
  end
  return 1
end
