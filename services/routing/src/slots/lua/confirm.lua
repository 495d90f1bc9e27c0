-- The assignment of conversation ARGV[2] to employee ARGV[3] (shop ARGV[4]) is committed in
-- PostgreSQL: make Redis say the same. Idempotent; removes any other claim on it.
-- Returns {'rebuild'} | {'ok', 'already'|'confirmed'}
local ep = redis.call('GET', KEYS[1])
if not ep then return { 'rebuild' } end
local conv, e, shop = ARGV[2], ARGV[3], ARGV[4]
local ck = P .. 'conv:' .. conv
local h = redis.call('HMGET', ck, 'e', 'exp', 'prev')
if h[1] == e and (tonumber(h[2]) or 0) == 0 then return { 'ok', 'already' } end
if h[1] and h[1] ~= e then
  rem_pending(h[1], conv)
  rem_open(h[1], conv)
  bump(h[1])
end
if h[3] and h[3] ~= '' and h[3] ~= e then
  rem_open(h[3], conv)
  bump(h[3])
end
rem_pending(e, conv)
add_open(e, conv)
bump(e)
redis.call('DEL', ck)
redis.call('HSET', ck, 'e', e, 's', shop, 'exp', '0')
return { 'ok', 'confirmed' }
