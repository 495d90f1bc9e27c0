-- Rebuilding the slot data from PostgreSQL after Redis lost it, under a lease.
-- ARGV: prefix, op, token, ...
--   begin(token, lease ms)         -> {'done'} (epoch present) | {'lease'} | {'busy'}
--   shop(token, shop, slots, candidates...)
--   away(token, employees...)
--   open(token, employee, conversation, shop, conversation, shop, ...)
--   last(token, shop, customer, employee, customer, employee, ...)
--   idle(token, employee, stamp, employee, stamp, ...)
--   finish(token, epoch)           -> {'ok'} and claims work again
-- Loading answers {'lost'} when the lease is no longer ours.
local op, token = ARGV[2], ARGV[3]
local lease = P .. 'lease'
if op == 'begin' then
  if epoch() then return { 'done' } end
  if redis.call('SET', lease, token, 'NX', 'PX', ARGV[4]) then return { 'lease' } end
  return { 'busy' }
end
if redis.call('GET', lease) ~= token then return { 'lost' } end
if epoch() then return { 'done' } end
if op == 'shop' then
  local shop = ARGV[4]
  redis.call('HSET', P .. 'shop:' .. shop, 'slots', ARGV[5])
  for i = 6, #ARGV do
    redis.call('SADD', P .. 'shop:' .. shop .. ':cand', ARGV[i])
  end
elseif op == 'away' then
  for i = 4, #ARGV do
    local s = get_st(ARGV[i])
    s.away = 1
    put_st(ARGV[i], s)
  end
elseif op == 'open' then
  local e = ARGV[4]
  local s = get_st(e)
  for i = 5, #ARGV, 2 do
    add_open(s, e, ARGV[i])
    redis.call('HSET', P .. 'conv:' .. ARGV[i], 'e', e, 's', ARGV[i + 1], 'exp', '0')
  end
  s.ver = s.ver + 1
  put_st(e, s)
elseif op == 'last' then
  local shop = ARGV[4]
  for i = 5, #ARGV, 2 do redis.call('HSET', P .. 'shop:' .. shop, 'c:' .. ARGV[i], ARGV[i + 1]) end
elseif op == 'idle' then
  for i = 4, #ARGV, 2 do
    local s = get_st(ARGV[i])
    s.idle = tonumber(ARGV[i + 1])
    put_st(ARGV[i], s)
  end
elseif op == 'finish' then
  redis.call('SET', KEYS[1], ARGV[4])
  redis.call('DEL', lease)
else
  return redis.error_reply('unknown op ' .. tostring(op))
end
return { 'ok' }
