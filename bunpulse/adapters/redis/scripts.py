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

SCRIPTS = {name: (_LIB + body, hashlib.sha1((_LIB + body).encode()).hexdigest())
           for name, body in _SOURCES.items()}
