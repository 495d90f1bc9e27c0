-- Shared helpers of the slot library (see src/slots/engine.rs). The engine loads this file
-- plus every script (claim.lua, ...) as one Redis function library: each script becomes the
-- body of a function(KEYS, ARGV) that starts with begin(KEYS, ARGV). So the helpers below are
-- created once, when the library loads, not on every call. Nothing else outlives a call: the
-- garbage collector runs with every call and walks the whole Lua heap, so keeping decoded
-- values around (tried) made claims slower, not faster.
--
-- KEYS[1] is the state hash `<prefix>st`; ARGV[1] the key prefix every key is built from. All
-- keys share the `{slots}` hash tag inside that prefix, so they live in one Redis Cluster slot
-- and the functions run unchanged on a cluster. Keys under the prefix:
--   st                hash holding everything an automatic claim reads or writes but the
--                     pending entry, so a claim reads it in two calls and writes it in one
--                     (each call from Lua costs more than most of the Lua around it). Fields:
--     #epoch          present iff the data was (re)built from PostgreSQL; value = epoch. Lost
--                     with the hash, and then every function answers 'rebuild'.
--     #clock          the last idle stamp handed out, struct-packed ('>d'; rebuilt stamps
--                     are negative ranks)
--     e:<e>           employee e, struct-packed (HDR): committed count, pending count (may
--                     include expired claims until purged), earliest pending expiry (a purge
--                     trigger), idle stamp (of the last assignment or close), away (1 = away or
--                     offline), version (bumped on every change of their conversations)
--     s:<s>           shop s, struct-packed (SHOP): slot limit, number of candidates, then the
--                     candidates (employees with the Chat permission there) as their `e:`
--                     field names, each zero-terminated, so they go to HMGET as they are
--     l:<s>\0<c>      the employee who last served customer c at shop s
--     c:<c>           conversation c's claim, struct-packed (CONV): expiry (0 = committed, else
--                     pending expiry), owner, shop, previous owner ('' unless a transfer is
--                     pending). Hash fields cannot expire (Redis 7.0): a pending claim that is
--                     not a transfer counts as gone GRACE ms after its expiry (when it used to
--                     expire as a key of its own) and is deleted by whoever reads it then, and
--                     by purge().
--   lease             the rebuild lease (token)
--   emp:<e>:open      set: conversations committed to e (all shops)
--   emp:<e>:pending   zset: conversations claimed for e, not yet committed; score = expiry (ms)
-- Values are binary: number/string conversions (tonumber, tostring, numbers as arguments)
-- cost a good part of a call each.
local HDR = '>iiddid'
local SHOP = '>dI'
local CONV = '>dsss'
-- Never assigned nor closed: idle longer than anyone with a stamp.
local NEVER = -1e15
-- How long an expired pending claim (not a transfer) is still seen by confirm and release.
local GRACE = 1000

-- Library functions as locals: a global lookup (a hash lookup; two for redis.call) costs more
-- than many of the operations it finds. Globals only exist while a function runs, so the
-- first call fills these in; they are plain C functions, the same for the library's life.
local call, tonumber, unpack, floor, sub, rep, concat, spack, sunpack

-- The state hash and the key prefix of the current call. Set first thing by every function;
-- Redis runs one function at a time, so they cannot change under a running call.
local ST, P

local function begin(keys, args)
  if not call then
    local G = _G
    call, tonumber, unpack, floor = G.redis.call, G.tonumber, G.unpack, G.math.floor
    sub, rep, concat = G.string.sub, G.string.rep, G.table.concat
    spack, sunpack = G.struct.pack, G.struct.unpack
  end
  ST = keys[1]
  P = args[1]
end

-- The epoch, or nil when Redis lost the data (then every function answers 'rebuild').
local function epoch()
  return call('HGET', ST, '#epoch')
end

-- Server time in milliseconds (whole numbers below 1e14 pass to Redis as exact integers).
local function now_ms()
  local t = call('TIME')
  return tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end

-- The idle clock from its field (raw, already read).
local function clock_of(raw)
  if not raw then return 0 end
  return (sunpack('>d', raw))
end

-- A strictly increasing stamp for the idle order, so two events never tie. (A claim reads and
-- writes the clock along with the rest instead.)
local function stamp()
  local c = clock_of(call('HGET', ST, '#clock')) + 1
  call('HSET', ST, '#clock', spack('>d', c))
  return c
end

local function pack(s)
  return spack(HDR, s.n, s.p, s.pmin, s.idle, s.away, s.ver)
end

-- A shop entry as { slots, k, k candidate field names }.
local function shop_of(raw)
  local slots, k, pos = sunpack(SHOP, raw)
  if k == 0 then return { slots, 0 } end
  local v = { slots, k, sunpack(rep('s', k), raw, pos) }
  v[k + 3] = nil -- unpack's trailing position
  return v
end

local function parse(raw)
  if not raw then return { n = 0, p = 0, pmin = 0, idle = NEVER, away = 0, ver = 0 } end
  local n, p, pmin, idle, away, ver = sunpack(HDR, raw)
  return { n = n, p = p, pmin = pmin, idle = idle, away = away, ver = ver }
end

local function get_st(e)
  return parse(call('HGET', ST, 'e:' .. e))
end

local function put_st(e, s)
  call('HSET', ST, 'e:' .. e, pack(s))
end

local function ok_key(e) return P .. 'emp:' .. e .. ':open' end
local function pk_key(e) return P .. 'emp:' .. e .. ':pending' end

local function add_open(s, e, conv)
  if call('SADD', ok_key(e), conv) == 1 then s.n = s.n + 1 end
end

local function rem_open(s, e, conv)
  if call('SREM', ok_key(e), conv) == 1 then s.n = s.n - 1 end
end

local function add_pending(s, e, conv, exp)
  if call('ZADD', pk_key(e), exp, conv) == 1 then s.p = s.p + 1 end
  if s.pmin == 0 or exp < s.pmin then s.pmin = exp end
end

local function rem_pending(s, e, conv)
  if call('ZREM', pk_key(e), conv) == 1 then s.p = s.p - 1 end
end

-- Drops expired pending claims and recounts. The claims of those past the grace are deleted
-- too (nobody may read them any more); younger ones are left to their next reader.
local function purge(s, e, now)
  local pk = pk_key(e)
  for _, c in ipairs(call('ZRANGEBYSCORE', pk, '-inf', now - GRACE)) do
    local raw = call('HGET', ST, 'c:' .. c)
    if raw then
      local exp, o, _, prev = sunpack(CONV, raw)
      if o == e and prev == '' and exp ~= 0 and exp + GRACE < now then
        call('HDEL', ST, 'c:' .. c)
      end
    end
  end
  call('ZREMRANGEBYSCORE', pk, '-inf', now)
  s.p = call('ZCARD', pk)
  local first = call('ZRANGE', pk, 0, 0, 'WITHSCORES')
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

-- A shop's slot limit and candidates (their `e:` field names, a list of its own); 0 and none
-- when unknown.
local function get_shop(shop)
  local raw = call('HGET', ST, 's:' .. shop)
  if not raw then return 0, {} end
  local v = shop_of(raw)
  return v[1], { unpack(v, 3, v[2] + 2) }
end

local function put_shop(shop, slots, c)
  local raw = spack(SHOP, slots, #c)
  if #c > 0 then raw = raw .. concat(c, '\0') .. '\0' end
  call('HSET', ST, 's:' .. shop, raw)
end

-- The position of x in list c, or nil.
local function find(c, x)
  for i = 1, #c do
    if c[i] == x then return i end
  end
  return nil
end

-- The stickiness field of a customer at a shop.
local function last_field(shop, cust)
  return 'l:' .. shop .. '\0' .. cust
end

local function pack_conv(exp, e, shop, prev)
  return spack(CONV, exp, e, shop, prev)
end

-- A conversation's claim from its field (raw, already read): owner, expiry, shop, previous
-- owner ('' if none); nil when there is none or it is a pending claim past the grace (then
-- deleted). now may be nil: the clock is only read when the grace matters.
local function read_conv(conv, raw, now)
  if not raw then return nil end
  local exp, e, shop, prev = sunpack(CONV, raw)
  if exp ~= 0 and prev == '' and exp + GRACE < (now or now_ms()) then
    call('HDEL', ST, 'c:' .. conv)
    return nil
  end
  return e, exp, shop, prev
end

local function get_conv(conv, now)
  return read_conv(conv, call('HGET', ST, 'c:' .. conv), now)
end

local function set_committed(conv, e, shop)
  call('HSET', ST, 'c:' .. conv, pack_conv(0, e, shop, ''))
end

-- The current claim on a conversation (raw: its field, already read): owner, expiry
-- (0 = committed), shop, previous owner ('' if none); nil when there is none. An expired pending
-- claim is cleaned up on the way: its slot is no longer counted, and a transfer that never
-- committed falls back to the previous (committed) owner.
local function owner(conv, raw, now)
  local e, exp, shop, prev = read_conv(conv, raw, now)
  if not e then return nil end
  if exp ~= 0 and exp <= now then
    local s = get_st(e)
    rem_pending(s, e, conv)
    put_st(e, s)
    if prev ~= '' then
      set_committed(conv, prev, shop)
      return prev, 0, shop, ''
    end
    call('HDEL', ST, 'c:' .. conv)
    return nil
  end
  return e, exp, shop, prev
end

-- Takes a pending claim of conv for e (state s, written back by the caller), expiring after
-- ttl milliseconds unless confirmed. Returns the packed claim: the caller writes it to
-- `c:<conv>` in the same HSET as the state. With prev (a transfer), the previous owner keeps
-- the conversation until the transfer commits; owner() falls back to them once it expired.
local function take_pending(s, conv, shop, e, now, ttl, prev)
  local exp = now + ttl
  add_pending(s, e, conv, exp)
  s.ver = s.ver + 1
  return pack_conv(exp, e, shop, prev or '')
end
