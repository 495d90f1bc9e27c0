-- wrk script of deploy/bench-ingress.sh: every request is a genuine MessageBird webhook with
-- its own pre-signed JWT (unique jti), read from files written by `ingress-bench gen`.
-- Environment: BENCH_DIR (bodies.txt, tokens.txt), BENCH_PATH (request path),
-- BENCH_THREADS (wrk -t).

local thread_counter = 0
function setup(thread)
  thread:set("tid", thread_counter)
  thread_counter = thread_counter + 1
end

local bodies, tokens, index, count, position, path = {}, {}, {}, 0, 0, "/"

function init(args)
  local dir = os.getenv("BENCH_DIR")
  local threads = tonumber(os.getenv("BENCH_THREADS") or "1")
  path = os.getenv("BENCH_PATH") or "/"
  for line in io.lines(dir .. "/bodies.txt") do
    bodies[#bodies + 1] = line
  end
  -- Each thread takes every n-th token, so no two threads send the same jti.
  local i = 0
  for line in io.lines(dir .. "/tokens.txt") do
    if i % threads == tid then
      local b, t = line:match("^(%d+)\t(.+)$")
      count = count + 1
      index[count] = tonumber(b)
      tokens[count] = t
    end
    i = i + 1
  end
end

function request()
  position = position + 1
  if position > count then
    -- Out of tokens: from here on requests are replays (answered 200 without publishing);
    -- the bench reads ingress_replays_total to detect and report this.
    position = 1
  end
  return wrk.format("POST", path, {
    ["Content-Type"] = "application/json",
    ["MessageBird-Signature-JWT"] = tokens[position],
  }, bodies[index[position]])
end
