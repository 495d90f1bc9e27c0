-- Automatic claim for one conversation of shop ARGV[3].
-- ARGV: prefix, conversation, shop, customer ('' if none), pending ttl (ms).
-- Returns {'rebuild'} | {'existing', employee, epoch, pending(0|1)}
--       | {'none', reason, epoch} | {'claimed', employee, epoch, open_before, slots}
local ep = epoch()
if not ep then return { 'rebuild' } end
local now = now_ms()
local conv, shop, cust = ARGV[2], ARGV[3], ARGV[4]
local ttl = tonumber(ARGV[5])

-- Idempotent per conversation: a retried claim returns the same employee, no second slot.
local o = owner(conv, now)
if o then
  local pending = '0'
  if o.exp ~= 0 then pending = '1' end
  return { 'existing', o.e, ep, pending }
end

local sk = P .. 'shop:' .. shop
local sh = redis.call('HMGET', sk, 'slots', 'c:' .. cust)
local slots = tonumber(sh[1] or '0')
if slots <= 0 then return { 'none', 'slots_zero', ep } end
local cands = redis.call('SMEMBERS', sk .. ':cand')
if #cands == 0 then return { 'none', 'no_permission', ep } end

local sticky = nil
if cust ~= '' then sticky = sh[2] end

-- Lua's unpack stops at a few thousand values: a very large staff is read in parts.
local raw
if #cands <= 1000 then
  raw = redis.call('HMGET', ST, unpack(cands))
else
  raw = {}
  for i = 1, #cands, 1000 do
    local part = redis.call('HMGET', ST, unpack(cands, i, math.min(i + 999, #cands)))
    for j = 1, #part do raw[i + j - 1] = part[j] end
  end
end
local best, best_s, best_load = nil, nil, 0
local present = false
for i, e in ipairs(cands) do
  local s = parse(raw[i])
  if s.away == 0 then
    present = true
    local l, purged = live(s, e, now)
    if purged then put_st(e, s) end
    if l < slots then
      if e == sticky then
        best, best_s, best_load = e, s, l
        break
      end
      if best == nil or l < best_load
        or (l == best_load and (s.idle < best_s.idle or (s.idle == best_s.idle and e < best))) then
        best, best_s, best_load = e, s, l
      end
    end
  end
end

if not best then
  if present then return { 'none', 'all_full', ep } end
  return { 'none', 'all_away', ep }
end

take_pending(best_s, conv, shop, best, now, ttl, nil)
best_s.idle = stamp()
put_st(best, best_s)
if cust ~= '' and sticky ~= best then redis.call('HSET', sk, 'c:' .. cust, best) end
return { 'claimed', best, ep, tostring(best_load), tostring(slots) }
