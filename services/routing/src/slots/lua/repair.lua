-- Replaces employee ARGV[2]'s committed conversations with what PostgreSQL says, but only if
-- nothing changed since `inspect` read version ARGV[3] and no claim of theirs is in flight:
-- a repair must never erase a claim that is about to commit.
-- ARGV: prefix, employee, version, then pairs conversation, shop.
-- Returns {'rebuild'} | {'skipped'} | {'repaired', added, removed}
local ep = redis.call('GET', KEYS[1])
if not ep then return { 'rebuild' } end
local now = now_us()
local e, ver = ARGV[2], ARGV[3]
if (redis.call('HGET', ek(e), 'ver') or '0') ~= ver then return { 'skipped' } end
if purge(e, now) > 0 then return { 'skipped' } end
local ok = ek(e) .. ':open'
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
for c, s in pairs(want) do
  if redis.call('SADD', ok, c) == 1 then
    local ck = P .. 'conv:' .. c
    redis.call('DEL', ck)
    redis.call('HSET', ck, 'e', e, 's', s, 'exp', '0')
    added = added + 1
  end
end
redis.call('HSET', ek(e), 'n', redis.call('SCARD', ok))
if added + removed > 0 then bump(e) end
return { 'repaired', tostring(added), tostring(removed) }
