-- GCRA (generic cell rate algorithm) in one round trip.
-- KEYS[1]  bucket key; its value is the theoretical arrival time (TAT) in
--          microseconds of server time.
-- ARGV[1]  emission interval T = period / limit, in microseconds
-- ARGV[2]  period P, in microseconds (burst tolerance + T)
-- ARGV[3]  cost (requests this check consumes)
-- ARGV[4]  floor: the highest TAT this caller has seen for the key (0 if none).
--          After Redis lost the key (restart without persistence, eviction) the
--          TAT restarts from here, so the limit holds across the loss.
-- Returns {allowed (0/1), remaining, reset_after_us, retry_after_us, tat_us}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local P = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local floor = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if floor > tat then tat = floor end
if tat < now then tat = now end
local new_tat = tat + T * cost
local allow_at = new_tat - P
if now < allow_at then
  local remaining = math.floor((P - (tat - now)) / T)
  if remaining < 0 then remaining = 0 end
  return {0, remaining, tat - now, allow_at - now, tat}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, math.floor((now - allow_at) / T), new_tat - now, 0, new_tat}
