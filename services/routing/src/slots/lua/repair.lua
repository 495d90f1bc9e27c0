-- Replaces employee ARGV[2]'s committed conversations with what PostgreSQL says, but only if
-- nothing changed since `inspect` read version ARGV[3] and no claim of theirs is in flight:
-- a repair must never erase a claim that is about to commit.
-- ARGV: prefix, employee, version, then pairs conversation, shop.
-- Returns {'rebuild'} | {'skipped'} | {'repaired', added, removed}
local ep = epoch()
if not ep then return { 'rebuild' } end
local now = now_ms()
local e, ver = ARGV[2], ARGV[3]
local s = get_st(e)
if tostring(s.ver) ~= ver then return { 'skipped' } end
purge(s, e, now)
if s.p > 0 then
  put_st(e, s)
  return { 'skipped' }
end
local ok = ok_key(e)
local want = {}
for i = 4, #ARGV, 2 do want[ARGV[i]] = ARGV[i + 1] end
local removed, added = 0, 0
for _, c in ipairs(redis.call('SMEMBERS', ok)) do
  if not want[c] then
    redis.call('SREM', ok, c)
    local ck = P .. 'conv:' .. c
    if redis.call('HGET', ck, 'e') == e then redis.call('DEL', ck) end
    removed = removed + 1
  end
end
for c, shop in pairs(want) do
  if redis.call('SADD', ok, c) == 1 then
    local ck = P .. 'conv:' .. c
    redis.call('DEL', ck)
    redis.call('HSET', ck, 'e', e, 's', shop, 'exp', '0')
    added = added + 1
  end
end
s.n = redis.call('SCARD', ok)
if added + removed > 0 then s.ver = s.ver + 1 end
put_st(e, s)
return { 'repaired', tostring(added), tostring(removed) }
