"""The Lua scripts: each changes a job's state, appends its event (and outbox task) and answers in one atomic step.

A script that changes a job returns the updated record (HGETALL's flat list), so no second round trip reads it
back between the change and the caller (where another writer could slip in).
"""

from __future__ import annotations

from service.webhooks import OUTBOX_MAXLEN

# Appends an event to a job's event stream (MAXLEN, expiring with the job) and, when the job's webhook subscribed to
# `hook`, a task to the webhook outbox. Returns the event id.
EMIT = """
local function emit(job_key, ev_key, outbox_key, maxlen, ttl_ms, payload, hook, job_id, pos)
  local id
  if pos then
    id = redis.call('XADD', ev_key, 'MAXLEN', maxlen, '*', 'e', payload, 'pos', pos)
  else
    id = redis.call('XADD', ev_key, 'MAXLEN', maxlen, '*', 'e', payload)
  end
  if ttl_ms > 0 then redis.call('PEXPIRE', ev_key, ttl_ms) end
  if hook ~= '' then
    local url = redis.call('HGET', job_key, 'webhook')
    if url and url ~= 'null' then
      local wanted = cjson.decode(redis.call('HGET', job_key, 'webhook_events') or '[]')
      for _, w in ipairs(wanted) do
        if w == hook then
          redis.call('XADD', outbox_key, 'MAXLEN', '~', '""" + str(OUTBOX_MAXLEN) + """', '*',
                     'job', job_id, 'hook', hook, 'event', id)
          break
        end
      end
    end
  end
  return id
end
"""

# Entries of a class stream not yet delivered to the group (acked entries are deleted, so XLEN - pending).
WAITING_FN = """
local function waiting(key, group)
  if redis.call('EXISTS', key) == 0 then return 0 end
  local ok, pending = pcall(redis.call, 'XPENDING', key, group)
  if not ok then return redis.call('XLEN', key) end
  return redis.call('XLEN', key) - pending[1]
end
"""

# KEYS: job, class stream, idem ('' for none), events, outbox, every class stream of the model+precision from the
# highest level down. ARGV: job id, ttl, max depth, group, events maxlen, queued event JSON, how many of those
# classes are above the job's (their waiting jobs are served first), field, value, ...
# The depth limit counts every class; the queued event's position counts the higher classes and the job's own.
# Returns {'created', entry id}, {'full', waiting}, or {'existing', job id, that job's fields (empty once it
# expired)}: its key has KEYS[1]'s prefix (one Redis, not a cluster).
SUBMIT = EMIT + WAITING_FN + """
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local key = string.sub(KEYS[1], 1, #KEYS[1] - #ARGV[1]) .. existing
    return {'existing', existing, redis.call('HGETALL', key)}
  end
end
pcall(redis.call, 'XGROUP', 'CREATE', KEYS[2], ARGV[4], '0', 'MKSTREAM')
local waiting_all, ahead = 0, 0
local n_higher = tonumber(ARGV[7])
for i = 6, #KEYS do
  local w = waiting(KEYS[i], ARGV[4])
  waiting_all = waiting_all + w
  if i - 5 <= n_higher or KEYS[i] == KEYS[2] then ahead = ahead + w end
end
if waiting_all >= tonumber(ARGV[3]) then return {'full', tostring(waiting_all)} end
redis.call('HSET', KEYS[1], unpack(ARGV, 8))
local id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('HSET', KEYS[1], 'msg_id', cjson.encode(id))
redis.call('EXPIRE', KEYS[1], ARGV[2])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2]) end
emit(KEYS[1], KEYS[4], KEYS[5], ARGV[5], tonumber(ARGV[2]) * 1000, ARGV[6], '', ARGV[1], tostring(ahead))
return {'created', id}
"""

# KEYS: job, events, outbox. ARGV: ttl, events maxlen, event JSON, hook ('' for none), job id, n_from, from...,
# field, value, ... (all values JSON text). Returns the updated job's fields, or false (gone, or another state).
TRANSITION = EMIT + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return false end
local n = tonumber(ARGV[6])
local ok = false
for i = 7, n + 6 do if ARGV[i] == cur then ok = true end end
if not ok then return false end
redis.call('HSET', KEYS[1], unpack(ARGV, n + 7))
redis.call('EXPIRE', KEYS[1], ARGV[1])
emit(KEYS[1], KEYS[2], KEYS[3], ARGV[2], tonumber(ARGV[1]) * 1000, ARGV[3], ARGV[4], ARGV[5], nil)
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: n jobs, their n event streams, the outbox. ARGV: events maxlen, then per job: id, step_total JSON pair,
# event JSON. Returns each status (JSON text) or false.
PROGRESS = EMIT + """
local out = {}
local n = (#KEYS - 1) / 2
for i = 1, n do
  local key = KEYS[i]
  local cur = redis.call('HGET', key, 'status')
  if cur == '"running"' then
    local base = 3 * (i - 1) + 1
    local p = cjson.decode(ARGV[base + 2])
    redis.call('HSET', key, 'progress_step', tostring(p[1]), 'progress_total', tostring(p[2]))
    emit(key, KEYS[n + i], KEYS[#KEYS], ARGV[1], redis.call('PTTL', key), ARGV[base + 3], 'progress', ARGV[base + 1],
         nil)
  end
  out[i] = cur
end
return out
"""

# KEYS: job. ARGV: attempt JSON, how many to keep. Appends to the job's webhook_attempts (a JSON list).
ATTEMPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local raw = redis.call('HGET', KEYS[1], 'webhook_attempts')
local list = {}
if raw and raw ~= '[]' then list = cjson.decode(raw) end
table.insert(list, cjson.decode(ARGV[1]))
while #list > tonumber(ARGV[2]) do table.remove(list, 1) end
redis.call('HSET', KEYS[1], 'webhook_attempts', cjson.encode(list))
return 1
"""

# KEYS: class streams. ARGV: group. Returns the waiting entries of each.
WAITING = WAITING_FN + """
local out = {}
for i, key in ipairs(KEYS) do out[i] = waiting(key, ARGV[1]) end
return out
"""

# KEYS: class streams in read order. ARGV: group, consumer, count (0: only report).
# Returns {entries, heads, tails}: entries = {key index, entry id, job id, ...} read in KEYS order, at most count;
# heads = each key's oldest waiting entry id after the read ('' for none); tails = each key's last entry id
# ('0-0' for none), from which a blocking XREAD wakes only on entries added later.
READ = """
local group, consumer, remaining = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function last_delivered(key)
  if redis.call('EXISTS', key) == 0 then return nil end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then return info['last-delivered-id'] end
  end
  redis.call('XGROUP', 'CREATE', key, group, '0')  -- the group was lost (a restart without persistence)
  return '0-0'
end
local entries = {}
for i, key in ipairs(KEYS) do
  if remaining <= 0 then break end
  if last_delivered(key) then
    local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', remaining, 'STREAMS', key, '>')
    if reply then
      for _, entry in ipairs(reply[1][2]) do
        local job = ''
        for j = 1, #entry[2], 2 do if entry[2][j] == 'job' then job = entry[2][j + 1] end end
        table.insert(entries, i)
        table.insert(entries, entry[1])
        table.insert(entries, job)
        remaining = remaining - 1
      end
    end
  end
end
local heads, tails = {}, {}
for i, key in ipairs(KEYS) do
  heads[i], tails[i] = '', '0-0'
  local last = last_delivered(key)
  if last then
    local first = redis.call('XRANGE', key, '(' .. last, '+', 'COUNT', 1)
    if first[1] then heads[i] = first[1][1] end
    local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
    if newest[1] then tails[i] = newest[1][1] end
  end
end
return {entries, heads, tails}
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
