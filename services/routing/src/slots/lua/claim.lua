-- Automatic claim for one conversation of shop ARGV[3].
-- ARGV: prefix, conversation, shop, customer ('' if none), pending ttl (ms).
-- Returns {'rebuild'} | {'existing', employee, epoch, pending(0|1)}
--       | {'none', reason, epoch} | {'claimed', employee, epoch, open_before, slots}
local ep = redis.call('GET', KEYS[1])
if not ep then return { 'rebuild' } end
local now = now_us()
local conv, shop, cust = ARGV[2], ARGV[3], ARGV[4]
local ttl = tonumber(ARGV[5]) * 1000

-- Idempotent per conversation: a retried claim returns the same employee, no second slot.
local o = owner(conv, now)
if o then
  local pending = '0'
  if o.exp ~= 0 then pending = '1' end
  return { 'existing', o.e, ep, pending }
end

local slots = tonumber(redis.call('HGET', P .. 'shop:' .. shop, 'slots') or '0')
if slots <= 0 then return { 'none', 'slots_zero', ep } end
local cands = redis.call('SMEMBERS', P .. 'shop:' .. shop .. ':cand')
if #cands == 0 then return { 'none', 'no_permission', ep } end

local sticky = nil
if cust ~= '' then sticky = redis.call('HGET', P .. 'last:' .. shop, cust) end

local best, best_load, best_idle = nil, 0, 0
local present = false
for _, e in ipairs(cands) do
  local l, away, idle = state_of(e, now)
  if not away then
    present = true
    if l < slots then
      if e == sticky then
        best, best_load = e, l
        break
      end
      if best == nil or l < best_load
        or (l == best_load and (idle < best_idle or (idle == best_idle and e < best))) then
        best, best_load, best_idle = e, l, idle
      end
    end
  end
end

if not best then
  if present then return { 'none', 'all_full', ep } end
  return { 'none', 'all_away', ep }
end

take_pending(conv, shop, best, now, ttl, nil)
touch(best, now)
if cust ~= '' then redis.call('HSET', P .. 'last:' .. shop, cust, best) end
return { 'claimed', best, ep, tostring(best_load), tostring(slots) }
