-- wrk report: one JSON line with the latency distribution (microseconds) and error counts.
-- WRK_METHOD and WRK_BODY (set by bench/wrk.py) make every request e.g. a form POST.
wrk.method = os.getenv("WRK_METHOD") or wrk.method
wrk.body = os.getenv("WRK_BODY") or wrk.body
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
