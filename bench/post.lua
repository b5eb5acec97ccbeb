-- wrk script: POST one JSON body, then print a machine-readable summary.
-- Body and authorization come from the environment (BENCH_BODY, BENCH_AUTH),
-- so the same script drives Marie, LiteLLM and the upstream itself.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = auth
end

-- Latency percentiles (in microseconds) for the CDF plots and the tables.
local points = {1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9}

done = function(summary, latency, requests)
  local e = summary.errors
  local parts = {}
  for _, p in ipairs(points) do
    parts[#parts + 1] = string.format('"%s":%d', tostring(p), latency:percentile(p))
  end
  parts[#parts + 1] = string.format('"max":%d', latency.max)
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"latency_us":{%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ",")))
end
