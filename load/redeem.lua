-- wrk script for `make bench`: redemptions of 1 fen cycling over many vouchers; counts answers by status.
-- Environment: CVL_WRK_TOKEN (provider bearer token), CVL_WRK_VOUCHERS (a file of voucher ids, one per line).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  ids = {}
  for line in io.lines(os.getenv("CVL_WRK_VOUCHERS")) do
    ids[#ids + 1] = line
  end
  n = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("CVL_WRK_TOKEN")
  created, refused, other = 0, 0, 0
end

function request()
  n = n + 1
  local body = '{"voucher_id":"' .. ids[(n % #ids) + 1] .. '","amount":1}'
  return wrk.format(nil, nil, nil, body)
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
