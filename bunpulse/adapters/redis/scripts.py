"""Every Redis key, pub/sub channel and Lua script BunPulse uses, each kind declared once.

The part of a key in braces is its Redis Cluster hash tag: a channel's keys share one slot, an
app's keys another, the deployment's own a third. No script touches keys of two tags, so every
script runs on one slot of a cluster as on a single Redis.
"""
import hashlib

SEP = "\x1f"  # joins the parts of a node's ownership fields (app id, channel, user id)
# Seconds a cache channel's "miss reported" marker lives at most. A backstop only: the scripts
# that vacate a channel delete it, so it outlives the channel's last subscriber only where
# nothing ever vacates it in Redis (the key of a deployment that stopped for good).
MISS_TTL = 3600


class Keys:
    """The keys of one deployment: each begins with its --redis-key-prefix ("bp"), outside
    the hash tag, so two deployments on one Redis share nothing and a channel's keys still
    share one slot."""

    def __init__(self, prefix="bp"):
        self.prefix = prefix
        # the deployment's
        self.NODES = f"{prefix}:{{{prefix}}}:nodes"      # sorted set: node -> last heartbeat
        self.CONTROL = f"{prefix}:{{{prefix}}}:control"  # pub/sub: watchlist events and
        #                                                  terminations, for every node

    def reap_lock(self, node):           # held by the one node that reaps a dead one
        return f"{self.prefix}:{{{self.prefix}}}:reap:{node}"

    # an app's
    def connections(self, app_id):       # hash: node -> its connections
        return f"{self.prefix}:{{{app_id}}}:conns"

    def users(self, app_id):             # hash: user -> signed-in connections in the deployment
        return f"{self.prefix}:{{{app_id}}}:users"

    def node_users(self, app_id, node):  # hash: user -> signed-in connections on node
        return f"{self.prefix}:{{{app_id}}}:users:{node}"

    def occupied(self, app_id, node):    # set: the channels node has subscribers in
        return f"{self.prefix}:{{{app_id}}}:occupied:{node}"

    def rate(self, app_id, kind, second):  # string: tokens of an API rate granted in a second
        return f"{self.prefix}:{{{app_id}}}:rate:{kind}:{second}"

    # a channel's
    def subscriptions(self, app_id, channel):        # hash: node -> its subscriptions
        return f"{self.prefix}:{{{app_id}:{channel}}}:subs"

    def members(self, app_id, channel):              # hash: user -> connections in the deployment
        return f"{self.prefix}:{{{app_id}:{channel}}}:members"

    def node_members(self, app_id, channel, node):   # hash: user -> connections on node
        return f"{self.prefix}:{{{app_id}:{channel}}}:members:{node}"

    def member_infos(self, app_id, channel):         # hash: user -> user_info (JSON)
        return f"{self.prefix}:{{{app_id}:{channel}}}:infos"

    def cache(self, app_id, channel):                # string: the last event, with the cache TTL
        return f"{self.prefix}:{{{app_id}:{channel}}}:cache"

    def cache_miss(self, app_id, channel):           # string: the miss was reported (occupied only)
        return f"{self.prefix}:{{{app_id}:{channel}}}:miss"

    def events(self, app_id, channel):               # pub/sub: the channel's events, between nodes
        return f"{self.prefix}:{{{app_id}:{channel}}}:events"

    # an app's webhooks (webhook_queue.py), on the app's slot: a script that moves a delayed
    # event into its targets' queues touches one slot
    def webhook_delayed(self, app_id):     # hash: delayed event's identity -> what to queue
        return f"{self.prefix}:{{{app_id}}}:wh:delayed"

    def webhook_due(self, app_id):         # sorted set: delayed event's identity -> due (ms)
        return f"{self.prefix}:{{{app_id}}}:wh:due"

    def webhook_queue(self, app_id, target):  # stream: a target's events, oldest first
        return f"{self.prefix}:{{{app_id}}}:wh:q:{target}"

    def webhook_lock(self, app_id, target):   # string: the node sending the target's batch
        return f"{self.prefix}:{{{app_id}}}:wh:lock:{target}"

    def webhook_retry(self, app_id, target):  # hash: the head batch's end and retry schedule
        return f"{self.prefix}:{{{app_id}}}:wh:retry:{target}"


# Each script changes a count and reports the deployment-wide total in one atomic step, so
# each transition (occupied, vacated, member added or removed, online, offline) and its
# webhook happens exactly once.
_LIB = """
-- Change a node's share of a counter split by node (hash node -> n); return the total.
local function counter(counts, node, delta)
  if redis.call('HINCRBY', counts, node, delta) <= 0 then redis.call('HDEL', counts, node) end
  local total = 0
  for _, v in ipairs(redis.call('HVALS', counts)) do total = total + tonumber(v) end
  return total
end
-- A user's connections (in a presence channel, or signed in): totals is user -> n in the
-- deployment, mine user -> n on the node, infos (optional) user -> user_info. Returns the
-- user's total.
local function member(totals, mine, infos, user, delta, info)
  if redis.call('HINCRBY', mine, user, delta) <= 0 then redis.call('HDEL', mine, user) end
  local c = redis.call('HINCRBY', totals, user, delta)
  if c <= 0 then
    redis.call('HDEL', totals, user)
    if infos then redis.call('HDEL', infos, user) end
  elseif infos and delta > 0 and c == delta then
    redis.call('HSET', infos, user, info)
  end
  return c
end
-- A channel's subscriptions (hash node -> n) changed; return the total. Once no node has one,
-- its "miss reported" marker goes too: nothing named by a client outlives its last subscriber.
local function subscriptions(counts, miss, node, delta)
  local total = counter(counts, node, delta)
  if total <= 0 then redis.call('DEL', miss) end
  return total
end
"""

_SOURCES = {
    # KEYS: counts. ARGV: node, delta.
    "counter": "return counter(KEYS[1], ARGV[1], tonumber(ARGV[2]))",
    # KEYS: subscriptions, miss. ARGV: node, delta.
    "channel": "return subscriptions(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]))",
    # KEYS: totals, mine[, infos]. ARGV: user, delta, info.
    "member": "return member(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]), ARGV[3])",
    # A presence join in one round trip, limit and roster included: {-1} when the channel is
    # full, else {channel total, user total, roster as HGETALL}. KEYS: subscriptions,
    # members, node members, infos. ARGV: node, user, info, limit.
    "join": """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 and
   redis.call('HLEN', KEYS[2]) >= tonumber(ARGV[4]) then return {-1} end
local total = counter(KEYS[1], ARGV[1], 1)
return {total, member(KEYS[2], KEYS[3], KEYS[4], ARGV[2], 1, ARGV[3]),
        redis.call('HGETALL', KEYS[4])}""",
    # A presence leave: {channel total, user total}. KEYS: as join's, and miss; ARGV: as
    # join's, without info and limit.
    "leave": """
return {subscriptions(KEYS[1], KEYS[5], ARGV[1], -1),
        member(KEYS[2], KEYS[3], KEYS[4], ARGV[2], -1, '')}""",
    # A subscriber found a cache channel empty: 1 when the cache_miss webhook is to be sent
    # (the first miss since the channel was occupied or filled), else 0. Only an occupied
    # channel keeps the marker: a miss on one vacated meanwhile is reported and nothing is
    # kept. KEYS: subscriptions, miss. ARGV: the marker's TTL.
    "miss": """
if redis.call('EXISTS', KEYS[1]) == 0 then return 1 end
if redis.call('SET', KEYS[2], 1, 'NX', 'EX', ARGV[1]) then return 1 end
return 0""",
    # Lease up to ARGV[1] tokens of an API rate whose limit is ARGV[2] a second: the number
    # granted (0 once the second is spent). The count never passes the limit, and goes with
    # its second. KEYS: the second's rate key. ARGV: wanted, limit.
    "lease": """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local granted = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used)
if granted <= 0 then return 0 end
redis.call('INCRBY', KEYS[1], granted)
redis.call('EXPIRE', KEYS[1], 10)
return granted""",
}

# Durable webhooks (webhook_queue.py). A target's queue is a stream sent from its head by one
# node at a time (the lock, a lease), so batches go out in order; an entry is deleted once
# delivered, so a node that dies mid-batch leaves it for the next. The head batch's end and its
# retry schedule live in Redis: a batch is retried whole, under the same id, by whichever node
# takes it next, when its schedule says.
_WEBHOOK_SOURCES = {
    # Queue one event unless the target holds `limit` already. KEYS: queue. ARGV: limit,
    # event (JSON). Returns the entry's id, or nil when full.
    "wh_add": """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'e', ARGV[2])""",
    # Delay an event (channel_vacated, member_removed): 0 when `limit` wait already (send it
    # now). KEYS: delayed, due. ARGV: identity, {"e": event, "q": [queues]}, due (ms), limit.
    "wh_delay": """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and
   redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1""",
    # A return in time: 1 when the delayed event was there (both are dropped), else 0.
    # KEYS: delayed, due. ARGV: identity.
    "wh_cancel": """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1""",
    # Move the delayed events that are due into their queues, in one step. KEYS: delayed, due.
    # ARGV: now (ms), limit, most events. Returns each queue added to, "!" before one that was
    # full (the event dropped there).
    "wh_due": """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0,
                               tonumber(ARGV[3]))) do
  local held = redis.call('HGET', KEYS[1], id)
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if held then
    held = cjson.decode(held)
    for _, queue in ipairs(held.q) do
      if redis.call('XLEN', queue) < tonumber(ARGV[2]) then
        redis.call('XADD', queue, '*', 'e', held.e)
        table.insert(out, queue)
      else
        table.insert(out, '!' .. queue)
      end
    end
  end
end
return out""",
    # Take a target's head batch to send it: {0} nothing queued, {1} another node sends it,
    # {2, at} its retry is due at `at` (ms), {3, entries} taken (the lock held for the lease).
    # The batch taken once is taken again, whole, until delivered or dropped.
    # KEYS: queue, lock, retry. ARGV: node, lease (ms), now (ms), batch size.
    "wh_take": """
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[3]) return {0} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {1} end
local at = tonumber(redis.call('HGET', KEYS[3], 'at') or '0')
if at > tonumber(ARGV[3]) then return {2, at} end
local last = redis.call('HGET', KEYS[3], 'last')
local entries = {}
if last then entries = redis.call('XRANGE', KEYS[1], '-', last) end
if #entries == 0 then
  redis.call('DEL', KEYS[3])
  entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[4]))
  redis.call('HSET', KEYS[3], 'last', entries[#entries][1])
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {3, entries}""",
    # The batch was delivered (or dropped): delete it (the queue too once empty: nothing
    # stays behind), its schedule, and the lock if still this node's. KEYS: queue, lock, retry. ARGV: node, entry ids...
    "wh_done": """
for i = 2, #ARGV do redis.call('XDEL', KEYS[1], ARGV[i]) end
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
redis.call('DEL', KEYS[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1""",
    # The batch failed: schedule its next try (backoff doubling up to a most, the first
    # failure's deadline kept) and free the lock; 0 when its deadline has passed (drop it).
    # KEYS: lock, retry. ARGV: node, now (ms), first backoff (ms), most backoff (ms), retry
    # for (ms).
    "wh_failed": """
local now = tonumber(ARGV[2])
local backoff = tonumber(redis.call('HGET', KEYS[2], 'backoff') or ARGV[3])
local deadline = tonumber(redis.call('HGET', KEYS[2], 'until') or (now + tonumber(ARGV[5])))
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if now >= deadline then return 0 end
redis.call('HSET', KEYS[2], 'at', now + math.min(backoff, deadline - now),
           'backoff', math.min(backoff * 2, tonumber(ARGV[4])), 'until', deadline)
return 1""",
}
_SOURCES.update(_WEBHOOK_SOURCES)

SCRIPTS = {name: (_LIB + body, hashlib.sha1((_LIB + body).encode()).hexdigest())
           for name, body in _SOURCES.items()}
