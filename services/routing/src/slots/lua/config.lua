-- Routing writes what the claim decides on: a shop's slot limit, its candidates, presence.
-- ARGV: prefix, op, a, b, ... Ops: slots(shop, n) | grant(shop, employee, employee...)
--       | revoke(shop, employee) | away(employee) | present(employee).
-- Returns {'rebuild'} | {'ok'}
local ep = epoch()
if not ep then return { 'rebuild' } end
local op, a, b = ARGV[2], ARGV[3], ARGV[4]
if op == 'slots' then
  redis.call('HSET', P .. 'shop:' .. a, 'slots', b)
elseif op == 'grant' then
  redis.call('SADD', P .. 'shop:' .. a .. ':cand', unpack(ARGV, 4))
elseif op == 'revoke' then
  redis.call('SREM', P .. 'shop:' .. a .. ':cand', b)
elseif op == 'away' or op == 'present' then
  local s = get_st(a)
  if op == 'away' then s.away = 1 else s.away = 0 end
  put_st(a, s)
else
  return redis.error_reply('unknown op ' .. tostring(op))
end
return { 'ok' }
