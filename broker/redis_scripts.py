"""The Lua scripts of the store (broker/store.py), kept beside it under the same rule: nothing
else runs Redis commands. Each touches the keys of one (credential, scope set) only, which share a
hash slot (or one key of its own), so they run unchanged on a Redis Cluster.

Values start `v<N>|<fence>|<fingerprint>|<window ms>|<deadline>|` (broker/entries.py): the scripts
read that header without JSON, and without the encryption key, so they cannot tell an edited one. A
fence near 2^53 was never issued (the counter counts locks taken) and is read as no fence: a Lua
number is exact only below 2^53, and Redis cannot return a larger one as an integer. Fences are
written with %d: Lua's own number-to-string (%.14g) would turn 10^14 into "1e+14".
"""

__all__ = ["ACQUIRE", "DROP_IF", "GET", "GRANT_PUT", "PUT", "RELEASE", "RENEW", "REWRAP", "TAKE_RATE", "VAULT_PUT"]

# A value, its key's PTTL and Redis's clock in one round trip: readers bound their copy by the
# key's own TTL and by the deadline sealed in the value, on the clock every broker shares.
GET = """
local v = redis.call('GET', KEYS[1])
if not v then return false end
local now = redis.call('TIME')
return {v, redis.call('PTTL', KEYS[1]), now[1], now[2]}
"""

# The fence a stored value was written under, or nil (none, or not one a counter gave out).
_FENCE_OF = """
local function fence_of(v)
  local f = string.match(v, '^v%d|(%d+)|')
  if f and #f <= 16 and tonumber(f) < 2^53 - 2^32 then return tonumber(f) end
  return nil
end
"""

# Fenced write: refused if the stored value (or tombstone) was written under a later lock. The
# key lives until the value's deadline (ARGV[3], ms on Redis's clock). Publishes so every worker
# can update its L1.
PUT = (
    _FENCE_OF
    + """
local cur = redis.call('GET', KEYS[1])
if cur then
  local f = fence_of(cur)
  if f and f > tonumber(ARGV[1]) then return 0 end
end
local now = redis.call('TIME')
local ttl = tonumber(ARGV[3]) - (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
if ttl < 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', string.format('%d', ttl))
redis.call('PUBLISH', ARGV[4], 'set|' .. ARGV[5] .. '|' .. KEYS[1])
return 1
"""
)

# Take the fetch lock (or find it already ours: a retry whose first reply was lost), with a fence
# above every fence issued or stored for the key. Returns the fence, or 0 when another holds it.
ACQUIRE = (
    _FENCE_OF
    + """
local held = redis.call('GET', KEYS[1])
if held then
  local owner, f = string.match(held, '^(.-)|(%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(f)
  end
  return 0
end
local n = redis.call('INCR', KEYS[2])
local cur = redis.call('GET', KEYS[3])
if cur then
  local f = fence_of(cur)
  if f and f >= n then
    n = f + 1
    redis.call('SET', KEYS[2], n)
  end
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. string.format('%d', n), 'PX', ARGV[2])
return n
"""
)

# Drop only the token that was reported (its fingerprint is one of ARGV[3..], one per encryption
# key), so a report about a replaced token is a no-op. The drop leaves a tombstone with the
# token's fence (a late write from an older lock cannot come back) for as long as the token would
# have been cached. A token younger than ARGV[2] ms is not dropped again while an earlier drop of
# the key is that recent (a report loop cannot drive fetches).
# Returns the dropped token's fence, 0 for "not the stored token", -1 for "too soon".
DROP_IF = (
    _FENCE_OF
    + """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local fp, window = string.match(cur, '^v%d|%d+|([^|]+)|(%d+)|')
local f = fence_of(cur) or 0
local reported = false
for i = 3, #ARGV do
  if fp == ARGV[i] then reported = true end
end
if not reported then return 0 end
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 1 then return 0 end
local min_age = tonumber(ARGV[2])
if tonumber(window) - pttl < min_age and redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('SET', KEYS[1], 'v2|' .. string.format('%d', f) .. '|-|0|0|', 'PX', pttl)
if min_age > 0 then redis.call('SET', KEYS[2], '1', 'PX', min_age) end
redis.call('PUBLISH', ARGV[1], 'drop|' .. fp .. '|' .. KEYS[1])
return f
"""
)

# rotate-key: replace a value only if nobody changed it meanwhile, keeping its TTL.
REWRAP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


# The vault document: replaced only by a writer that read the current version (compare-and-set),
# then announced on the events channel so every worker reloads it at once. A version that is not
# up to 15 digits was not written here (edited in Redis): brokers read it as -1, and the writer
# that read -1 replaces it by Redis's clock in ms, above any count a broker may still hold.
VAULT_PUT = """
local stored = redis.call('GET', KEYS[2])
local current = 0
if stored then
  current = -1
  if string.match(stored, '^%d+$') and #stored <= 15 then current = tonumber(stored) end
end
if current ~= tonumber(ARGV[1]) then return 0 end
local version = current + 1
if current < 0 then
  local now = redis.call('TIME')
  version = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
version = string.format('%d', version)
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], version)
redis.call('PUBLISH', ARGV[3], 'vault|' .. version .. '|' .. KEYS[1])
return tonumber(version)
"""


# A subject's grant record (`g1|<version>|<sealed>`, spec §5.4): a compare-and-set on its version,
# and, when a lock value is given, only while that lock is still held: a holder that lost its
# lock may neither redeem the refresh token nor write what redeeming it gave.
GRANT_PUT = """
local cur = redis.call('GET', KEYS[1])
local version = 0
if cur then version = tonumber(string.match(cur, '^g1|(%d+)|')) or 0 end
if version ~= tonumber(ARGV[1]) then return 0 end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then return -1 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

# A caller's rate limit (spec §6.6) as GCRA: the key holds the theoretical arrival time (TAT, µs
# on Redis's clock, the one clock every broker shares). ARGV: rate per second, burst, units
# wanted. Grants as many of the wanted units as the limit allows now (a worker's batch), moves the
# TAT by that many emission intervals, and keeps the key only while the TAT is ahead of now
# (+ 1 s): an expired key and a TAT in the past mean the same, a full burst.
# Returns {units granted, ms until the next unit is free}.
TAKE_RATE = """
local interval = 1000000 / tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local stored = redis.call('GET', KEYS[1])
-- Sums relative to now: at 1.8e15 µs a double is exact to 0.25 µs only, 1/4 of an interval at 1e6/s.
local ahead = stored and tonumber(stored) - now or 0
if ahead < 0 then ahead = 0 end
local room = math.floor((burst * interval - ahead) / interval + 1e-6)
local granted = math.max(0, math.min(want, room))
if granted > 0 then
  ahead = ahead + granted * interval
  redis.call('SET', KEYS[1], string.format('%.17g', now + ahead), 'PX', math.ceil(ahead / 1000) + 1000)
end
local wait = ahead + interval - burst * interval
if wait < 0 then wait = 0 end
return {granted, math.ceil(wait / 1000)}
"""
