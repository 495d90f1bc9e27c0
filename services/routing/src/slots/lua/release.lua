-- Gives back the slot of conversation ARGV[2].
-- ARGV: prefix, conversation, expected employee ('' = whoever holds it), mode:
--   'close'    the conversation left the employee (closed, handed back, transferred away):
--              frees the slot and restarts the employee's idle time
--   'rollback' a claim whose PostgreSQL commit failed: only a pending claim is undone, and a
--              transfer falls back to the previous owner
-- Returns {'rebuild'} | {'none'} | {'released', employee, open_after} | {'restored', previous}
local conv, expected, mode = ARGV[2], ARGV[3], ARGV[4]
local h = call('HMGET', ST, '#epoch', 'c:' .. conv)
if not h[1] then return { 'rebuild' } end
local now = now_ms()
local he, exp, hs, prev = read_conv(conv, h[2], now)
if not he then return { 'none' } end
if expected ~= '' and he ~= expected then return { 'none' } end
if mode == 'rollback' and exp == 0 then return { 'none' } end
local s = get_st(he)
rem_pending(s, he, conv)
rem_open(s, he, conv)
s.ver = s.ver + 1
if prev ~= '' then
  if mode == 'rollback' then
    put_st(he, s)
    set_committed(conv, prev, hs)
    return { 'restored', prev }
  end
  local o = get_st(prev)
  rem_open(o, prev, conv)
  o.ver = o.ver + 1
  put_st(prev, o)
end
call('HDEL', ST, 'c:' .. conv)
if mode == 'close' then s.idle = stamp() end
local l = live(s, he, now)
put_st(he, s)
return { 'released', he, l }
