-- uses queue.lua
-- A waiter gives up its place (it waited too long, or was cancelled); if it was first
-- in line and the lock is free, the next waiter is woken.
-- KEYS: lock, queue, waiters. ARGV: token, wake prefix.
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', ARGV[2] .. ARGV[1])
wake_head(KEYS[1], KEYS[2], KEYS[3], ARGV[2])
return 1
