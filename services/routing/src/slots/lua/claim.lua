-- Automatic claim for one conversation of shop ARGV[3].
-- ARGV: prefix, conversation, shop, customer ('' if none), pending ttl (ms).
-- Returns {'rebuild'} | {'existing', employee, epoch, pending(0|1)}
--       | {'none', reason, epoch} | {'claimed', employee, epoch, open_before, slots}
-- A claim that succeeds makes five calls: one read of everything known before the candidates
-- (epoch, shop, the conversation's claim, stickiness), TIME, one read of the candidates (and
-- the idle clock), the pending entry and one write of the rest. Numbers go back as integer
-- replies (no number formatting).
local conv, shop, cust = ARGV[2], ARGV[3], ARGV[4]
local ttl = tonumber(ARGV[5])
local cf = 'c:' .. conv
local lf = nil
local h
if cust ~= '' then
  lf = last_field(shop, cust)
  h = call('HMGET', ST, '#epoch', 's:' .. shop, cf, lf)
else
  h = call('HMGET', ST, '#epoch', 's:' .. shop, cf)
end
local ep = h[1]
if not ep then return { 'rebuild' } end
local now = now_ms()

-- Idempotent per conversation: a retried claim returns the same employee, no second slot.
if h[3] then
  local oe, oexp = owner(conv, h[3], now)
  if oe then
    local pending = 0
    if oexp ~= 0 then pending = 1 end
    return { 'existing', oe, ep, pending }
  end
end

local cfg = h[2]
if not cfg then return { 'none', 'slots_zero', ep } end
local shop_v = shop_of(cfg)
local slots, k = shop_v[1], shop_v[2]
if slots <= 0 then return { 'none', 'slots_zero', ep } end
if k == 0 then return { 'none', 'no_permission', ep } end
-- The clock rides along: the winner's stamp goes out in the same HSET as their state.
local raw = call('HMGET', ST, '#clock', unpack(shop_v, 3, k + 2))

local sticky = nil
if lf and h[4] then sticky = 'e:' .. h[4] end

local best, bi, bload, bidle = nil, 0, 0, 0
local present = false
local purged = nil
for i = 1, k do
  local r = raw[i + 1]
  local n, p, pmin, idle, away = 0, 0, 0, NEVER, 0
  if r then n, p, pmin, idle, away = sunpack(HDR, r) end
  if away == 0 then
    present = true
    local e = shop_v[i + 2]
    if p > 0 and pmin <= now then
      -- Expired claims stop counting (rare: claims are confirmed within milliseconds).
      local s = parse(r)
      local id = sub(e, 3)
      purge(s, id, now)
      put_st(id, s)
      purged = purged or {}
      purged[i] = s
      p = s.p
    end
    local l = n + p
    if l < slots then
      if e == sticky then
        best, bi, bload = e, i, l
        break
      end
      -- Ties on the idle stamp only happen between employees never assigned: by id.
      if best == nil or l < bload
        or (l == bload and (idle < bidle
          or (idle == bidle and sub(e, 3) < sub(best, 3)))) then
        best, bi, bload, bidle = e, i, l, idle
      end
    end
  end
end

if not best then
  if present then return { 'none', 'all_full', ep } end
  return { 'none', 'all_away', ep }
end

local id = sub(best, 3)
local s = (purged and purged[bi]) or parse(raw[bi + 1])
local claim = take_pending(s, conv, shop, id, now, ttl, nil)
s.idle = clock_of(raw[1]) + 1
local clock = spack('>d', s.idle)
if lf and sticky ~= best then
  call('HSET', ST, best, pack(s), '#clock', clock, cf, claim, lf, id)
else
  call('HSET', ST, best, pack(s), '#clock', clock, cf, claim)
end
return { 'claimed', id, ep, bload, slots }
