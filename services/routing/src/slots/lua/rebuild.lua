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
  if redis.call('GET', KEYS[1]) then return { 'done' } end
  if redis.call('SET', lease, token, 'NX', 'PX', ARGV[4]) then return { 'lease' } end
  return { 'busy' }
end
if redis.call('GET', lease) ~= token then return { 'lost' } end
if redis.call('GET', KEYS[1]) then return { 'done' } end
if op == 'shop' then
  local s = ARGV[4]
  redis.call('HSET', P .. 'shop:' .. s, 'slots', ARGV[5])
  for i = 6, #ARGV do
    redis.call('SADD', P .. 'shop:' .. s .. ':cand', ARGV[i])
  end
elseif op == 'away' then
  for i = 4, #ARGV do redis.call('HSET', ek(ARGV[i]), 'away', '1') end
elseif op == 'open' then
  local e = ARGV[4]
  for i = 5, #ARGV, 2 do
    add_open(e, ARGV[i])
    redis.call('HSET', P .. 'conv:' .. ARGV[i], 'e', e, 's', ARGV[i + 1], 'exp', '0')
  end
  bump(e)
elseif op == 'last' then
  local s = ARGV[4]
  for i = 5, #ARGV, 2 do redis.call('HSET', P .. 'last:' .. s, ARGV[i], ARGV[i + 1]) end
elseif op == 'idle' then
  for i = 4, #ARGV, 2 do redis.call('HSET', ek(ARGV[i]), 'idle', ARGV[i + 1]) end
elseif op == 'finish' then
  local now = now_us()
  local last = tonumber(redis.call('GET', P .. 'clock') or '0')
  if last < now then redis.call('SET', P .. 'clock', fmt(now)) end
  redis.call('SET', KEYS[1], ARGV[4])
  redis.call('DEL', lease)
else
  return redis.error_reply('unknown op ' .. tostring(op))
end
return { 'ok' }
