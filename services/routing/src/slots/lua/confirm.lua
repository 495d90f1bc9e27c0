-- The assignment of conversation ARGV[2] to employee ARGV[3] (shop ARGV[4]) is committed in
-- PostgreSQL: make Redis say the same. Idempotent; removes any other claim on it.
-- Returns {'rebuild'} | {'ok', 'already'|'confirmed'}
local ep = epoch()
if not ep then return { 'rebuild' } end
local conv, e, shop = ARGV[2], ARGV[3], ARGV[4]
local ck = P .. 'conv:' .. conv
local h = redis.call('HMGET', ck, 'e', 'exp', 'prev')
if h[1] == e and (tonumber(h[2]) or 0) == 0 then return { 'ok', 'already' } end
if h[1] and h[1] ~= e then
  local o = get_st(h[1])
  rem_pending(o, h[1], conv)
  rem_open(o, h[1], conv)
  o.ver = o.ver + 1
  put_st(h[1], o)
end
if h[3] and h[3] ~= '' and h[3] ~= e then
  local o = get_st(h[3])
  rem_open(o, h[3], conv)
  o.ver = o.ver + 1
  put_st(h[3], o)
end
local s = get_st(e)
rem_pending(s, e, conv)
add_open(s, e, conv)
s.ver = s.ver + 1
put_st(e, s)
redis.call('DEL', ck)
redis.call('HSET', ck, 'e', e, 's', shop, 'exp', '0')
return { 'ok', 'confirmed' }
