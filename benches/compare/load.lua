-- wrk script for benches/compare: POST /input with pre-signed bodies, one per request,
-- or (with no arguments) plain GETs of the URL.
--
--   wrk -t T -c C -d 10s -s load.lua http://127.0.0.1:PORT/input -- BODIES_FILE once|repeat T
--   wrk -t T -c C -d 10s -s load.lua http://127.0.0.1:PORT/health
--
-- BODIES_FILE holds one JSON body per line, each signed once (a host refuses a replayed
-- signature). Thread i of T sends lines i, i+T, i+2T, …, so no two threads share a body.
-- With a plain (unsigned) body file the same line may repeat: "repeat" cycles through the
-- lines; "once" stops the thread when its lines run out.
--
-- done() prints one line, `COMPARE {json}`, with the counts benches/compare/compare.py
-- reads: requests by status, wrk's socket errors, p50/p99 in µs, and whether a thread ran
-- out of bodies (then it stopped early and the figures of that run are not usable).

local threads = {}
local nthreads = 0

function setup(thread)
   thread:set("tid", nthreads)
   nthreads = nthreads + 1
   table.insert(threads, thread)
end

-- Thread-local from here on (each wrk thread has its own Lua state).
local bodies = {}
local n = 0
local next_i = 1
local cycle = false
local get_mode = false
ok = 0
statuses = {}
exhausted = 0

function init(args)
   local path = args[1]
   if path == nil then
      get_mode = true
      return
   end
   cycle = args[2] == "repeat"
   local file = assert(io.open(path, "r"))
   local line_no = 0
   -- `tid` was set by setup(); the thread count comes as the third argument.
   local t = tonumber(tid) or 0
   local tt = tonumber(args[3] or "1") or 1
   for line in file:lines() do
      if line_no % tt == t then
         n = n + 1
         bodies[n] = line
      end
      line_no = line_no + 1
   end
   file:close()
   assert(n > 0, "no bodies for thread " .. t .. " in " .. path)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   if get_mode then
      return wrk.format()
   end
   if next_i > n then
      if cycle then
         next_i = 1
      else
         exhausted = 1
         wrk.thread:stop()
         next_i = n -- a replay: the host refuses it, and the run is flagged
      end
   end
   local body = bodies[next_i]
   next_i = next_i + 1
   return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
   if status >= 200 and status < 300 then
      ok = ok + 1
   end
   local key = tostring(status)
   statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
   local total_ok, ex = 0, 0
   local merged = {}
   for _, thread in ipairs(threads) do
      total_ok = total_ok + (thread:get("ok") or 0)
      ex = ex + (thread:get("exhausted") or 0)
      local st = thread:get("statuses") or {}
      for k, v in pairs(st) do
         merged[k] = (merged[k] or 0) + v
      end
   end
   local parts = {}
   for k, v in pairs(merged) do
      table.insert(parts, string.format('"%s":%d', k, v))
   end
   local e = summary.errors
   io.write(string.format(
      'COMPARE {"duration_us":%d,"requests":%d,"ok":%d,"statuses":{%s},' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},' ..
      '"p50_us":%d,"p99_us":%d,"max_us":%d,"exhausted":%d}\n',
      summary.duration, summary.requests, total_ok, table.concat(parts, ","),
      e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(99), latency.max, ex))
end
