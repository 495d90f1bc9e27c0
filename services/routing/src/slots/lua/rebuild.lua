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
  if call('SET', lease, token, 'NX', 'PX', ARGV[4]) then return { 'lease' } end
  return { 'busy' }
end
if call('GET', lease) ~= token then return { 'lost' } end
if epoch() then return { 'done' } end
if op == 'shop' then
  local shop = ARGV[4]
  local _, c = get_shop(shop)
  for i = 6, #ARGV do
    local e = 'e:' .. ARGV[i]
    if not find(c, e) then table.insert(c, e) end
  end
  put_shop(shop, tonumber(ARGV[5]), c)
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
    set_committed(ARGV[i], e, ARGV[i + 1])
  end
  s.ver = s.ver + 1
  put_st(e, s)
elseif op == 'last' then
  local shop = ARGV[4]
  for i = 5, #ARGV, 2 do call('HSET', ST, last_field(shop, ARGV[i]), ARGV[i + 1]) end
elseif op == 'idle' then
  for i = 4, #ARGV, 2 do
    local s = get_st(ARGV[i])
    s.idle = tonumber(ARGV[i + 1])
    put_st(ARGV[i], s)
  end
elseif op == 'finish' then
  call('HSET', ST, '#epoch', ARGV[4])
  call('DEL', lease)
else
  return redis.error_reply('unknown op ' .. tostring(op))
end
return { 'ok' }
