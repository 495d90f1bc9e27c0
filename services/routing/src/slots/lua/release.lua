-- Gives back the slot of conversation ARGV[2].
-- ARGV: prefix, conversation, expected employee ('' = whoever holds it), mode:
--   'close'    the conversation left the employee (closed, handed back, transferred away):
--              frees the slot and restarts the employee's idle time
--   'rollback' a claim whose PostgreSQL commit failed: only a pending claim is undone, and a
--              transfer falls back to the previous owner
-- Returns {'rebuild'} | {'none'} | {'released', employee, open_after} | {'restored', previous}
local ep = epoch()
if not ep then return { 'rebuild' } end
local now = now_ms()
local conv, expected, mode = ARGV[2], ARGV[3], ARGV[4]
local ck = P .. 'conv:' .. conv
local h = redis.call('HMGET', ck, 'e', 'exp', 's', 'prev')
if not h[1] then return { 'none' } end
if expected ~= '' and h[1] ~= expected then return { 'none' } end
local exp = tonumber(h[2]) or 0
if mode == 'rollback' and exp == 0 then return { 'none' } end
local s = get_st(h[1])
rem_pending(s, h[1], conv)
rem_open(s, h[1], conv)
s.ver = s.ver + 1
redis.call('DEL', ck)
local prev = h[4]
if prev and prev ~= '' then
  if mode == 'rollback' then
    put_st(h[1], s)
    redis.call('HSET', ck, 'e', prev, 's', h[3] or '', 'exp', '0')
    return { 'restored', prev }
  end
  local o = get_st(prev)
  rem_open(o, prev, conv)
  o.ver = o.ver + 1
  put_st(prev, o)
end
if mode == 'close' then s.idle = stamp() end
local l = live(s, h[1], now)
put_st(h[1], s)
return { 'released', h[1], tostring(l) }
