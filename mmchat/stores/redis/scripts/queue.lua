-- The fair turn lock of one session, shared by the scripts that take, release or
-- leave it (the loader puts this file before each of them).
--
-- `lock` holds the token of the turn that has the session, with a lease. Waiters queue
-- in `queue` (a list of tokens, oldest first); `waiters` (a sorted set) holds how long
-- each waiter's place is kept (server time, ms): a waiter refreshes it while it waits,
-- so one whose process died is dropped once that passes. The lock goes only to the
-- head of the queue, and each grant adds 1 to the session's fencing token (`fence` in
-- `meta`), which every write of the turn must still match. A waiter sleeps on its own
-- wake list (`<wake prefix><token>`, BLPOP); whoever frees the lock pushes to the head's.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The head of the queue after dropping the waiters at its front that stopped waiting.
local function live_head(queue, waiters, now)
  while true do
    local head = redis.call('LINDEX', queue, 0)
    if not head then
      return nil
    end
    local until_ms = redis.call('ZSCORE', waiters, head)
    if until_ms and tonumber(until_ms) >= now then
      return head
    end
    redis.call('LPOP', queue)
    redis.call('ZREM', waiters, head)
  end
end

-- Wake the head of the queue if the lock is free.
local function wake_head(lock, queue, waiters, wake_prefix)
  if redis.call('EXISTS', lock) == 1 then
    return
  end
  local head = live_head(queue, waiters, now_ms())
  if head then
    local key = wake_prefix .. head
    redis.call('RPUSH', key, 1)
    redis.call('PEXPIRE', key, 60000)
  end
end

-- Take the lock for `token` if it is free and `token` is first in line. Returns
-- {1, fencing token} or, having queued `token` (or kept its place),
-- {0, place in the queue from 1, ms until the holder's lease ends (-2: free)}.
local function take(lock, queue, waiters, meta, token, lease, keep_ms, ttl, wake_prefix)
  local now = now_ms()
  local head = live_head(queue, waiters, now)
  if redis.call('EXISTS', lock) == 0 and (not head or head == token) then
    redis.call('SET', lock, token, 'PX', lease)
    if head then
      redis.call('LPOP', queue)
      redis.call('ZREM', waiters, token)
    end
    redis.call('DEL', wake_prefix .. token)
    local fence = redis.call('HINCRBY', meta, 'fence', 1)
    redis.call('PEXPIRE', meta, ttl)
    return {1, fence}
  end
  if not redis.call('ZSCORE', waiters, token) then
    redis.call('RPUSH', queue, token)
  end
  redis.call('ZADD', waiters, now + keep_ms, token)
  redis.call('PEXPIRE', queue, 2 * keep_ms)
  redis.call('PEXPIRE', waiters, 2 * keep_ms)
  return {0, redis.call('LPOS', queue, token) + 1, redis.call('PTTL', lock)}
end

-- Drop the lock if it still holds `token` and wake the next waiter; 1 if it did.
local function release(lock, queue, waiters, token, wake_prefix)
  if redis.call('GET', lock) ~= token then
    return 0
  end
  redis.call('DEL', lock)
  wake_head(lock, queue, waiters, wake_prefix)
  return 1
end
