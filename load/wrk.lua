-- wrk script for `make bench`: POSTs with a bearer token; counts answers by status.
-- Environment: CVL_WRK_TOKEN (bearer token), and either CVL_WRK_BODY (one JSON body sent every time: single mints)
-- or CVL_WRK_VOUCHERS (a file of voucher ids, one per line: redemptions of 1 fen cycling over them).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("CVL_WRK_TOKEN")
  wrk.body = os.getenv("CVL_WRK_BODY")
  ids = {}
  local path = os.getenv("CVL_WRK_VOUCHERS")
  if path then
    for line in io.lines(path) do
      ids[#ids + 1] = line
    end
  end
  n = 0
  created, refused, other = 0, 0, 0
end

-- Defined only when there are vouchers to cycle over: without a request() wrk sends its one prepared request, which
-- costs the load generator nothing per request.
if os.getenv("CVL_WRK_VOUCHERS") then
  function request()
    n = n + 1
    return wrk.format(nil, nil, nil, '{"voucher_id":"' .. ids[(n % #ids) + 1] .. '","amount":1}')
  end
end

function response(status, headers, body)
  if status == 201 then
    created = created + 1
  elseif status == 409 then
    refused = refused + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local c, r, o = 0, 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("created")
    r = r + t:get("refused")
    o = o + t:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    '{"created":%d,"refused":%d,"other":%d,"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"socket_errors":%d}\n',
    c, r, o, summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout))
end
