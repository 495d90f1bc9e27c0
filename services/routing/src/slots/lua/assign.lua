-- Manual assignment or transfer of a conversation of shop ARGV[3] to employee ARGV[4].
-- ARGV: prefix, conversation, shop, employee, force (0|1), pending ttl (ms), customer ('' if none).
-- Returns {'rebuild'} | {'existing', employee, epoch} | {'busy', employee, epoch}
--       | {'no_permission', epoch} | {'full', open, slots, epoch}
--       | {'claimed', employee, epoch, open_before, slots, over_limit(0|1), previous owner or ''}
local conv, shop, e, force, cust = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[7] or ''
local ttl = tonumber(ARGV[6])
local cf = 'c:' .. conv
local h = call('HMGET', ST, '#epoch', cf)
local ep = h[1]
if not ep then return { 'rebuild' } end
local now = now_ms()

local oe, oexp = owner(conv, h[2], now)
if oe == e then return { 'existing', e, ep } end
-- Another claim is in flight; the caller retries once it settled.
if oe and oexp ~= 0 then return { 'busy', oe, ep } end
local slots, cands = get_shop(shop)
if not find(cands, 'e:' .. e) then return { 'no_permission', ep } end
local s = get_st(e)
local l = live(s, e, now)
local over = 0
if l >= slots then
  if force ~= '1' then
    put_st(e, s)
    return { 'full', l, slots, ep }
  end
  over = 1
end
local claim = take_pending(s, conv, shop, e, now, ttl, oe)
s.idle = stamp()
if cust ~= '' then
  call('HSET', ST, 'e:' .. e, pack(s), cf, claim, last_field(shop, cust), e)
else
  call('HSET', ST, 'e:' .. e, pack(s), cf, claim)
end
return { 'claimed', e, ep, l, slots, over, oe or '' }
