-- Routing writes what the claim decides on: a shop's slot limit, its candidates, presence.
-- ARGV: prefix, op, a, b. Ops: slots(shop, n) | grant(shop, employee) | revoke(shop, employee)
--       | away(employee) | present(employee).
-- Returns {'rebuild'} | {'ok'}
local ep = epoch()
if not ep then return { 'rebuild' } end
local op, a, b = ARGV[2], ARGV[3], ARGV[4]
if op == 'slots' then
  local _, c = get_shop(a)
  put_shop(a, tonumber(b), c)
elseif op == 'grant' or op == 'revoke' then
  local slots, c = get_shop(a)
  local i = find(c, 'e:' .. b)
  if op == 'grant' and not i then
    table.insert(c, 'e:' .. b)
    put_shop(a, slots, c)
  elseif op == 'revoke' and i then
    table.remove(c, i)
    put_shop(a, slots, c)
  end
elseif op == 'away' or op == 'present' then
  local s = get_st(a)
  if op == 'away' then s.away = 1 else s.away = 0 end
  put_st(a, s)
else
  return redis.error_reply('unknown op ' .. tostring(op))
end
return { 'ok' }
