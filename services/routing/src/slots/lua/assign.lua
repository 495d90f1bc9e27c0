-- Manual assignment or transfer of a conversation of shop ARGV[3] to employee ARGV[4].
-- ARGV: prefix, conversation, shop, employee, force (0|1), pending ttl (ms), customer ('' if none).
-- Returns {'rebuild'} | {'existing', employee, epoch} | {'busy', employee, epoch}
--       | {'no_permission', epoch} | {'full', open, slots, epoch}
--       | {'claimed', employee, epoch, open_before, slots, over_limit(0|1), previous owner or ''}
local ep = epoch()
if not ep then return { 'rebuild' } end
local now = now_ms()
local conv, shop, e, force, cust = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[7] or ''
local ttl = tonumber(ARGV[6])

local o = owner(conv, now)
if o and o.e == e then return { 'existing', e, ep } end
-- Another claim is in flight; the caller retries once it settled.
if o and o.exp ~= 0 then return { 'busy', o.e, ep } end
if redis.call('SISMEMBER', P .. 'shop:' .. shop .. ':cand', e) == 0 then
  return { 'no_permission', ep }
end
local slots = tonumber(redis.call('HGET', P .. 'shop:' .. shop, 'slots') or '0')
local s = get_st(e)
local l = live(s, e, now)
local over = '0'
if l >= slots then
  if force ~= '1' then
    put_st(e, s)
    return { 'full', tostring(l), tostring(slots), ep }
  end
  over = '1'
end
local prev = nil
if o then prev = o.e end
take_pending(s, conv, shop, e, now, ttl, prev)
s.idle = stamp()
put_st(e, s)
if cust ~= '' then redis.call('HSET', P .. 'shop:' .. shop, 'c:' .. cust, e) end
return { 'claimed', e, ep, tostring(l), tostring(slots), over, prev or '' }
