-- uses queue.lua
-- Drop the lock if it still holds our token, and wake the next waiter.
-- KEYS: lock, queue, waiters. ARGV: token, wake prefix.
return release(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
