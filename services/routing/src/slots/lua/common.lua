-- Shared helpers, prepended to every slot script (see src/slots/engine.rs).
--
-- KEYS[1] is the epoch key; ARGV[1] the key prefix every other key is built from. All keys
-- share the `{slots}` hash tag inside that prefix, so they live in one Redis Cluster slot and
-- the scripts run unchanged on a cluster. Keys under the prefix:
--   epoch              present iff the data was (re)built from PostgreSQL; value = epoch
--   lease              the rebuild lease (token)
--   shop:<s>           hash: slots, and c:<customer> -> employee who last served them at s
--   shop:<s>:cand      set: employees with the Chat permission at s
--   st                 hash: employee -> struct-packed state: committed count, pending count
--                      (may include expired claims until purged), earliest pending expiry (a
--                      purge trigger), idle stamp (of the last assignment or close), away
--                      (1 = away or offline), version (bumped on every change of their
--                      conversations). One hash, so a claim reads all candidates in one call;
--                      binary, because number/string conversions dominate a script's cost.
--   clock              counter handing out idle stamps (rebuilt ones are negative ranks)
--   emp:<e>:open       set: conversations committed to e (all shops)
--   emp:<e>:pending    zset: conversations claimed for e, not yet committed; score = expiry (ms)
--   conv:<c>           hash: e (owner), s (shop), exp (0 = committed, else pending expiry), prev
local P = ARGV[1]
local ST = P .. 'st'
local FMT = '>iiddid'
-- Never assigned nor closed: idle longer than anyone with a stamp.
local NEVER = -1e15

-- The epoch, or nil when Redis lost the data (then every script answers 'rebuild').
local function epoch()
  return redis.call('GET', KEYS[1])
end

-- Server time in milliseconds (whole numbers below 1e14 pass to Redis as exact integers).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A strictly increasing stamp for the idle order, so two events never tie.
local function stamp()
  return redis.call('INCR', P .. 'clock')
end

local function parse(raw)
  if not raw then return { n = 0, p = 0, pmin = 0, idle = NEVER, away = 0, ver = 0 } end
  local n, p, pmin, idle, away, ver = struct.unpack(FMT, raw)
  return { n = n, p = p, pmin = pmin, idle = idle, away = away, ver = ver }
end

local function get_st(e)
  return parse(redis.call('HGET', ST, e))
end

local function put_st(e, s)
  redis.call('HSET', ST, e, struct.pack(FMT, s.n, s.p, s.pmin, s.idle, s.away, s.ver))
end

local function ok_key(e) return P .. 'emp:' .. e .. ':open' end
local function pk_key(e) return P .. 'emp:' .. e .. ':pending' end

local function add_open(s, e, conv)
  if redis.call('SADD', ok_key(e), conv) == 1 then s.n = s.n + 1 end
end

local function rem_open(s, e, conv)
  if redis.call('SREM', ok_key(e), conv) == 1 then s.n = s.n - 1 end
end

local function add_pending(s, e, conv, exp)
  if redis.call('ZADD', pk_key(e), exp, conv) == 1 then s.p = s.p + 1 end
  if s.pmin == 0 or exp < s.pmin then s.pmin = exp end
end

local function rem_pending(s, e, conv)
  if redis.call('ZREM', pk_key(e), conv) == 1 then s.p = s.p - 1 end
end

-- Drops expired pending claims and recounts.
local function purge(s, e, now)
  local pk = pk_key(e)
  redis.call('ZREMRANGEBYSCORE', pk, '-inf', now)
  s.p = redis.call('ZCARD', pk)
  local first = redis.call('ZRANGE', pk, 0, 0, 'WITHSCORES')
  s.pmin = tonumber(first[2] or '0')
end

-- Open conversations across all shops: committed plus live pending. Returns the load and
-- whether the state changed (an expired claim was purged).
local function live(s, e, now)
  if s.p > 0 and s.pmin <= now then
    purge(s, e, now)
    return s.n + s.p, true
  end
  return s.n + s.p, false
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
    local s = get_st(h[1])
    rem_pending(s, h[1], conv)
    put_st(h[1], s)
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

-- Records a pending claim of conv for e (state s, written back by the caller), expiring after
-- ttl milliseconds unless confirmed.
local function take_pending(s, conv, shop, e, now, ttl, prev)
  local ck = P .. 'conv:' .. conv
  local exp = now + ttl
  -- Every field is written (the key is new, or a committed claim being transferred).
  redis.call('HSET', ck, 'e', e, 's', shop, 'exp', exp)
  if prev then
    -- The previous owner keeps the conversation until the transfer commits.
    redis.call('HSET', ck, 'prev', prev)
  else
    redis.call('PEXPIRE', ck, ttl + 1000)
  end
  add_pending(s, e, conv, exp)
  s.ver = s.ver + 1
end

