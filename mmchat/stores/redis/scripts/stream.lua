-- Appending reply events to a session's stream, shared by append.lua and end_turn.lua.

-- XADD `n` entries from ARGV, 5 values each from ARGV[first]: id, response id, kind,
-- text, data ('' for none); keep about `maxlen` entries.
local function add_entries(stream, maxlen, first, n)
  for i = 0, n - 1 do
    local at = first + 5 * i
    if ARGV[at + 4] == '' then
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, ARGV[at],
                 'r', ARGV[at + 1], 'k', ARGV[at + 2], 't', ARGV[at + 3])
    else
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, ARGV[at],
                 'r', ARGV[at + 1], 'k', ARGV[at + 2], 't', ARGV[at + 3], 'd', ARGV[at + 4])
    end
  end
end
