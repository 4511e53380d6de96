-- uses queue.lua
-- Take a session's turn lock, or queue for it (see queue.lua's take).
-- KEYS: lock, queue, waiters, meta. ARGV: token, lease (ms), place kept (ms), TTL (ms),
-- wake prefix.
return take(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
