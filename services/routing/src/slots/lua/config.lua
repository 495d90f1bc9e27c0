-- Routing writes what the claim decides on: a shop's slot limit, its candidates, presence.
-- ARGV: prefix, op, a, b. Ops: slots(shop, n) | grant(shop, employee) | revoke(shop, employee)
--       | away(employee) | present(employee).
-- Returns {'rebuild'} | {'ok'}
local ep = redis.call('GET', KEYS[1])
if not ep then return { 'rebuild' } end
local op, a, b = ARGV[2], ARGV[3], ARGV[4]
if op == 'slots' then
  redis.call('HSET', P .. 'shop:' .. a, 'slots', b)
elseif op == 'grant' then
  redis.call('SADD', P .. 'shop:' .. a .. ':cand', b)
elseif op == 'revoke' then
  redis.call('SREM', P .. 'shop:' .. a .. ':cand', b)
elseif op == 'away' then
  redis.call('HSET', ek(a), 'away', '1')
elseif op == 'present' then
  redis.call('HDEL', ek(a), 'away')
else
  return redis.error_reply('unknown op ' .. tostring(op))
end
return { 'ok' }
