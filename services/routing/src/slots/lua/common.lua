-- Shared helpers, prepended to every slot script (see src/slots/engine.rs).
--
-- KEYS[1] is the epoch key; ARGV[1] the key prefix every other key is built from. All keys
-- share the `{slots}` hash tag inside that prefix, so they live in one Redis Cluster slot and
-- the scripts run unchanged on a cluster. Keys under the prefix:
--   epoch              present iff the data was (re)built from PostgreSQL; value = epoch
--   lease              the rebuild lease (token)
--   clock              last idle stamp handed out (strictly increasing)
--   shop:<s>           hash: slots
--   shop:<s>:cand      set: employees with the Chat permission at s
--   emp:<e>            hash: n (committed count), p (pending count, may include expired ones
--                      until purged), pmin (earliest pending expiry, a purge trigger),
--                      away ('1' when away or offline), idle (stamp of the last assignment or
--                      close), ver (bumped on every change of e's conversations)
--   emp:<e>:open       set: conversations committed to e (all shops)
--   emp:<e>:pending    zset: conversations claimed for e, not yet committed; score = expiry (us)
--   last:<s>           hash: customer -> employee who last served them at s
--   conv:<c>           hash: e (owner), s (shop), exp (0 = committed, else pending expiry), prev
-- The counts in emp:<e> mirror the set and zset so a claim reads one hash per candidate.
local P = ARGV[1]

local function fmt(n)
  return string.format('%.0f', n)
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function ek(e)
  return P .. 'emp:' .. e
end

-- A strictly increasing stamp for the idle order, so two events never tie.
local function stamp(now)
  local last = tonumber(redis.call('GET', P .. 'clock') or '0')
  local s = now
  if s <= last then s = last + 1 end
  redis.call('SET', P .. 'clock', fmt(s))
  return s
end

local function touch(e, now)
  redis.call('HSET', ek(e), 'idle', fmt(stamp(now)))
end

local function bump(e)
  redis.call('HINCRBY', ek(e), 'ver', 1)
end

local function add_open(e, conv)
  if redis.call('SADD', ek(e) .. ':open', conv) == 1 then redis.call('HINCRBY', ek(e), 'n', 1) end
end

local function rem_open(e, conv)
  if redis.call('SREM', ek(e) .. ':open', conv) == 1 then redis.call('HINCRBY', ek(e), 'n', -1) end
end

local function add_pending(e, conv, exp)
  if redis.call('ZADD', ek(e) .. ':pending', fmt(exp), conv) == 1 then
    redis.call('HINCRBY', ek(e), 'p', 1)
  end
  local pmin = tonumber(redis.call('HGET', ek(e), 'pmin') or '0')
  if pmin == 0 or exp < pmin then redis.call('HSET', ek(e), 'pmin', fmt(exp)) end
end

local function rem_pending(e, conv)
  if redis.call('ZREM', ek(e) .. ':pending', conv) == 1 then
    redis.call('HINCRBY', ek(e), 'p', -1)
  end
end

-- Drops expired pending claims and recounts; returns the live pending count.
local function purge(e, now)
  local pk = ek(e) .. ':pending'
  redis.call('ZREMRANGEBYSCORE', pk, '-inf', fmt(now))
  local p = redis.call('ZCARD', pk)
  local first = redis.call('ZRANGE', pk, 0, 0, 'WITHSCORES')
  local pmin = first[2] or '0'
  redis.call('HSET', ek(e), 'p', p, 'pmin', pmin)
  return p
end

-- Open conversations across all shops (committed plus live pending), away, idle stamp.
local function state_of(e, now)
  local h = redis.call('HMGET', ek(e), 'n', 'p', 'pmin', 'away', 'idle')
  local n = tonumber(h[1]) or 0
  local p = tonumber(h[2]) or 0
  if p > 0 and (tonumber(h[3]) or 0) <= now then p = purge(e, now) end
  return n + p, h[4] == '1', tonumber(h[5]) or 0
end

local function load_of(e, now)
  local l = state_of(e, now)
  return l
end

-- The current claim on a conversation, or nil. An expired pending claim is cleaned up on the
-- way: its slot is no longer counted, and a transfer that never committed falls back to the
-- previous (committed) owner.
local function owner(conv, now)
  local ck = P .. 'conv:' .. conv
  local h = redis.call('HMGET', ck, 'e', 'exp', 's', 'prev')
  if not h[1] then return nil end
  local exp = tonumber(h[2]) or 0
  if exp ~= 0 and exp <= now then
    rem_pending(h[1], conv)
    redis.call('DEL', ck)
    if h[4] and h[4] ~= '' then
      redis.call('HSET', ck, 'e', h[4], 's', h[3] or '', 'exp', '0')
      return { e = h[4], exp = 0, s = h[3], prev = nil }
    end
    return nil
  end
  local prev = h[4]
  if prev == '' then prev = nil end
  return { e = h[1], exp = exp, s = h[3], prev = prev }
end

-- Records a pending claim of conv for e, expiring after ttl microseconds unless confirmed.
local function take_pending(conv, shop, e, now, ttl, prev)
  local ck = P .. 'conv:' .. conv
  local exp = now + ttl
  redis.call('DEL', ck)
  redis.call('HSET', ck, 'e', e, 's', shop, 'exp', fmt(exp))
  if prev then
    -- The previous owner keeps the conversation until the transfer commits.
    redis.call('HSET', ck, 'prev', prev)
  else
    redis.call('PEXPIRE', ck, math.floor(ttl / 1000) + 1000)
  end
  add_pending(e, conv, exp)
  bump(e)
end

