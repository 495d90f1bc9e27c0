-- What Redis holds for employee ARGV[2]: {'ok', version, live pending, open conversations...}
-- or {'rebuild'}.
local ep = redis.call('GET', KEYS[1])
if not ep then return { 'rebuild' } end
local now = now_us()
local e = ARGV[2]
local ver = redis.call('HGET', ek(e), 'ver') or '0'
local pending = purge(e, now)
local out = { 'ok', ver, tostring(pending) }
for _, c in ipairs(redis.call('SMEMBERS', ek(e) .. ':open')) do
  table.insert(out, c)
end
return out
