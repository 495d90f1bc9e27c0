-- The assignment of conversation ARGV[2] to employee ARGV[3] (shop ARGV[4]) is committed in
-- PostgreSQL: make Redis say the same. Idempotent; removes any other claim on it.
-- Returns {'rebuild'} | {'ok', 'already'|'confirmed'}
local conv, e, shop = ARGV[2], ARGV[3], ARGV[4]
local cf = 'c:' .. conv
-- The employee's state comes along: in the usual case (their own pending claim) it is the
-- only one that changes.
local h = call('HMGET', ST, '#epoch', cf, 'e:' .. e)
if not h[1] then return { 'rebuild' } end
local he, hexp, _, hprev = read_conv(conv, h[2], nil)
if he == e and hexp == 0 then return { 'ok', 'already' } end
if he and he ~= e then
  local o = get_st(he)
  rem_pending(o, he, conv)
  rem_open(o, he, conv)
  o.ver = o.ver + 1
  put_st(he, o)
end
if hprev and hprev ~= '' and hprev ~= e then
  local o = get_st(hprev)
  rem_open(o, hprev, conv)
  o.ver = o.ver + 1
  put_st(hprev, o)
end
local s = parse(h[3])
rem_pending(s, e, conv)
add_open(s, e, conv)
s.ver = s.ver + 1
call('HSET', ST, 'e:' .. e, pack(s), cf, pack_conv(0, e, shop, ''))
return { 'ok', 'confirmed' }
