-- What Redis holds for employee ARGV[2]: {'ok', version, live pending, open conversations...}
-- or {'rebuild'}.
local ep = epoch()
if not ep then return { 'rebuild' } end
local now = now_ms()
local e = ARGV[2]
local s = get_st(e)
purge(s, e, now)
put_st(e, s)
local out = { 'ok', tostring(s.ver), tostring(s.p) }
for _, c in ipairs(redis.call('SMEMBERS', ok_key(e))) do
  table.insert(out, c)
end
return out
