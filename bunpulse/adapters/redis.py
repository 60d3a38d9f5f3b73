"""The Redis adapter: several workers and machines behave as one server.

- Delivery: each node delivers to its own sockets first, then publishes the prebuilt frame on
  one pub/sub channel tagged with its node id; every node drops its own messages. Local
  delivery therefore survives a Redis outage.
- Shared state: per-channel subscription counts, presence members, signed-in users and
  connection counts live in Redis hashes, each count split by the node that owns it, and each
  node keeps an index of what it owns. Lua scripts change a count and report the
  deployment-wide transition (occupied, vacated, member added or removed, user online or
  offline) atomically, so each transition, and its webhook, happens exactly once.
- Liveness: nodes heartbeat into a sorted set. A node silent for NODE_TIMEOUT seconds is reaped
  by one surviving node (a SET NX lock): its counts are removed through the same scripts, and
  the resulting vacated/member_removed/offline events are delivered and webhooked once.
- Outage: a failed call marks Redis down (logged once); the node serves its own sockets from
  the hub, a greenlet reconnects with backoff, resubscribes and reconciles what this node owns.
"""
import hashlib
import logging
import secrets
import time

import gevent
import orjson
import redis

from ..config import redacted
from ..errors import PresenceFull
from .local import LocalAdapter

log = logging.getLogger("bunpulse.redis")

BUS = "bp:bus"
NODES = "bp:nodes"
NODE_TIMEOUT = 10.0     # seconds without a heartbeat before a node is reaped
HEARTBEAT = 1.0
REAP_EVERY = 2.0
POOL_SIZE = 128         # Redis connections a worker holds at most (plus its subscriber)
POOL_WAIT = 30.0        # seconds a call may wait for a free connection
SEP = "\x1f"

# The scripts change a count and report the deployment-wide total in one atomic step.
_LIB = """
-- Change a node's share of a per-node counter (hash node -> n) and the node's ownership
-- index (hash field -> n); return the total across nodes.
local function node_counter(counts, index, node, delta, field)
  if redis.call('HINCRBY', counts, node, delta) <= 0 then redis.call('HDEL', counts, node) end
  if redis.call('HINCRBY', index, field, delta) <= 0 then redis.call('HDEL', index, field) end
  local total = 0
  for _, v in ipairs(redis.call('HVALS', counts)) do total = total + tonumber(v) end
  return total
end
-- Channel occupancy: the counter plus the app's set of occupied channels.
local function channel(counts, index, occupied, node, delta, field, name)
  local total = node_counter(counts, index, node, delta, field)
  if total > 0 then redis.call('SADD', occupied, name) else redis.call('SREM', occupied, name) end
  return total
end
-- A user's connections in a presence channel (or signed in), across nodes: counts is
-- user -> n, infos user -> user_info. Returns the user's total.
local function member(counts, infos, index, user, delta, info, field)
  local c = redis.call('HINCRBY', counts, user, delta)
  if c <= 0 then
    redis.call('HDEL', counts, user)
    redis.call('HDEL', infos, user)
  elseif delta > 0 and c == delta then
    redis.call('HSET', infos, user, info)
  end
  if redis.call('HINCRBY', index, field, delta) <= 0 then redis.call('HDEL', index, field) end
  return c
end
"""

_SOURCES = {
    # KEYS: counts, index. ARGV: node, delta, field.
    "counter": "return node_counter(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), ARGV[3])",
    # KEYS: counts, index, occupied set. ARGV: node, delta, field, channel.
    "channel": "return channel(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]), "
               "ARGV[3], ARGV[4])",
    # KEYS: counts, infos, index. ARGV: user, delta, info, field.
    "member": "return member(KEYS[1], KEYS[2], KEYS[3], ARGV[1], tonumber(ARGV[2]), ARGV[3], "
              "ARGV[4])",
    # A presence join in one round trip, limit and roster included: {-1} when the channel is
    # full, else {channel total, user total, roster as HGETALL}. KEYS: channel counts, subs
    # index, occupied set, member counts, member infos, presence index. ARGV: node, subs
    # field, channel, user, info, presence field, limit.
    "join": """
if redis.call('HEXISTS', KEYS[4], ARGV[4]) == 0 and
   redis.call('HLEN', KEYS[4]) >= tonumber(ARGV[7]) then return {-1} end
local total = channel(KEYS[1], KEYS[2], KEYS[3], ARGV[1], 1, ARGV[2], ARGV[3])
local c = member(KEYS[4], KEYS[5], KEYS[6], ARGV[4], 1, ARGV[5], ARGV[6])
return {total, c, redis.call('HGETALL', KEYS[5])}""",
}

_EMPTY = {"subs": {}, "pres": {}, "users": {}, "conns": {}}


SCRIPTS = {name: (_LIB + body, hashlib.sha1((_LIB + body).encode()).hexdigest())
           for name, body in _SOURCES.items()}


class RedisDown(Exception):
    pass


def _k(app_id, kind, name=""):
    return f"bp:{app_id}:{kind}:{name}"


class RedisAdapter(LocalAdapter):
    def __init__(self, hub, settings):
        super().__init__(hub)
        self.url = settings.redis_url
        self.node = secrets.token_hex(8)
        self.core = None
        # A blocking pool: hundreds of greenlets may call at once, and redis-py's default
        # pool refuses the 101st ("Too many connections") instead of making it wait. A busy
        # worker can keep a greenlet waiting for a connection for seconds: that is congestion,
        # not an outage, so the wait is long; a Redis that stops answering still fails fast
        # through the socket timeouts of the connections in use.
        pool = redis.BlockingConnectionPool.from_url(
            self.url, max_connections=POOL_SIZE, timeout=POOL_WAIT, socket_connect_timeout=1,
            socket_timeout=3, health_check_interval=10)
        self._redis = redis.Redis(connection_pool=pool)
        # Heartbeats and reaping on a connection of their own: a worker whose pool is busy
        # must never look dead to the others.
        self._control = redis.Redis.from_url(self.url, socket_connect_timeout=1,
                                             socket_timeout=3)
        self._metrics = hub.metrics
        self._up = False
        self._running = False
        self._greenlets = []

    @property
    def _up(self):
        return self.__up

    @_up.setter
    def _up(self, up):
        self.__up = up
        self._metrics.redis_up.set(1 if up else 0)

    def ready(self):
        return self._up

    # ---------------------------------------------------------------- life cycle

    def bind(self, core):
        self.core = core

    def start(self):
        self._running = True
        try:
            self._load_scripts()
            self._heartbeat_once()
            self._up = True
        except redis.RedisError as exc:
            log.error("Redis at %s is unreachable (%s): serving this node's sockets alone "
                      "until it answers", redacted(self.url), exc)
        self._greenlets = [gevent.spawn(self._listen), gevent.spawn(self._keep_alive)]
        log.info("Redis adapter: node %s on %s", self.node, redacted(self.url))

    def stop(self):
        # The node stays in NODES: what its closing sockets do not clean up themselves is
        # reaped by the survivors once its heartbeat stops.
        self._running = False
        gevent.killall(self._greenlets, block=False)

    def _call(self, func, *args, **kwargs):
        if not self._up:
            raise RedisDown()
        try:
            return func(*args, **kwargs)
        except redis.RedisError as exc:
            self._down(exc)
            raise RedisDown() from exc

    def _down(self, exc):
        if self._up:
            self._up = False
            log.error("lost Redis (%s): serving this node's sockets alone; reconnecting", exc)

    # ---------------------------------------------------------------- background greenlets

    def _listen(self):
        """Deliver frames published by the other nodes; resubscribe after any failure."""
        backoff = 0.1
        while self._running:
            pubsub = None
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(BUS)
                backoff = 0.1
                handled = 0
                while self._running:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self._on_bus(message["data"])
                        handled += 1
                        if handled % 200 == 0:
                            gevent.sleep(0)  # a burst from Redis must not starve the sockets
            except redis.RedisError as exc:
                self._metrics.redis_relay_errors.inc()
                self._down(exc)
            except Exception:  # noqa: BLE001 - one bad message must not stop the listener
                self._metrics.redis_relay_errors.inc()
                log.exception("Redis listener failed; restarting it")
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001
                        pass
            gevent.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _keep_alive(self):
        """Heartbeat, reap dead nodes, and come back after an outage."""
        backoff, last_reap = 0.2, 0.0
        while self._running:
            if not self._up:
                try:
                    self._load_scripts()
                except redis.RedisError:
                    gevent.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.2
                log.info("Redis is back: reconciling this node's state")
                try:
                    self._reconcile()  # sets _up at the right moment
                except redis.RedisError as exc:
                    self._down(exc)
                    continue
            try:
                if self._heartbeat_once():
                    # Reaped by the others (this worker stalled past NODE_TIMEOUT): count
                    # this node's sockets in again.
                    log.warning("this node was taken for dead: reconciling its state")
                    self._up = False
                    continue
                if time.monotonic() - last_reap >= REAP_EVERY:
                    last_reap = time.monotonic()
                    self._reap_dead_nodes()
            except redis.RedisError as exc:
                self._down(exc)
            except RedisDown:
                pass
            except Exception:  # noqa: BLE001
                log.exception("Redis keep-alive failed")
            gevent.sleep(HEARTBEAT)

    def _heartbeat_once(self):
        """Returns True when this node was missing from NODES (first beat, or reaped)."""
        return self._control.zadd(NODES, {self.node: time.time()}) == 1

    def _load_scripts(self):
        # Called by EVALSHA alone afterwards; a Redis that restarted and forgot them answers
        # NOSCRIPT, which counts as an outage: the reconnect loads them again.
        for source, _ in SCRIPTS.values():
            self._control.script_load(source)

    def _eval(self, name, keys, args, pipe=None):
        return (pipe if pipe is not None else self._redis).evalsha(
            SCRIPTS[name][1], len(keys), *keys, *args)

    # ---------------------------------------------------------------- the bus

    def _broadcast_remote(self, kind, app_id, target, frame=b"", extra=""):
        header = orjson.dumps([self.node, kind, app_id, target, extra])
        try:
            self._call(self._redis.publish, BUS, header + b"\n" + frame)
        except RedisDown:  # the other nodes miss it; this node already delivered its share
            self._metrics.redis_relay_errors.inc()

    def _on_bus(self, raw):
        header, _, frame = raw.partition(b"\n")
        node, kind, app_id, target, extra = orjson.loads(header)
        if node == self.node:
            return
        if kind == "pub":
            self.hub.broadcast(app_id, target, frame, extra or None)
        elif kind == "watch":
            super().tell_watchers(app_id, target, frame)
        elif kind == "term":
            super().terminate_user(app_id, target)

    # ---------------------------------------------------------------- delivery

    def publish(self, app_id, channel, frame, except_socket_id=None):
        count = self.hub.broadcast(app_id, channel, frame, except_socket_id)  # this worker
        self._broadcast_remote("pub", app_id, channel, frame, except_socket_id or "")  # others
        return count

    def tell_watchers(self, app_id, user_id, frame):
        super().tell_watchers(app_id, user_id, frame)
        self._broadcast_remote("watch", app_id, user_id, frame)

    def terminate_user(self, app_id, user_id):
        super().terminate_user(app_id, user_id)
        self._broadcast_remote("term", app_id, user_id)

    # ---------------------------------------------------------------- shared counters

    # Each takes the node whose share changes: this one, or a dead one being reaped.

    def _channel_delta(self, app_id, channel, delta, pipe=None, node=None):
        node = node or self.node
        return self._eval(
            "channel", [_k(app_id, "ch", channel), f"bp:node:{node}:subs", _k(app_id, "channels")],
            [node, delta, f"{app_id}{SEP}{channel}", channel], pipe)

    def _member_delta(self, app_id, channel, user_id, delta, info=None, pipe=None, node=None):
        return self._eval(
            "member", [_k(app_id, "pu", channel), _k(app_id, "pi", channel),
                       f"bp:node:{node or self.node}:pres"],
            [user_id, delta, orjson.dumps(info), f"{app_id}{SEP}{channel}{SEP}{user_id}"], pipe)

    def _user_delta(self, app_id, user_id, delta, pipe=None, node=None):
        return self._eval(
            "member", [_k(app_id, "users"), _k(app_id, "userinfo"),
                       f"bp:node:{node or self.node}:users"],
            [user_id, delta, b"null", f"{app_id}{SEP}{user_id}"], pipe)

    def _connections_delta(self, app_id, delta, pipe=None, node=None):
        node = node or self.node
        return self._eval("counter", [_k(app_id, "conns"), f"bp:node:{node}:conns"],
                          [node, delta, app_id], pipe)

    # ---------------------------------------------------------------- connections

    def add_connection(self, conn):
        super().add_connection(conn)
        try:
            self._call(self._connections_delta, conn.app.id, 1)
        except RedisDown:
            pass

    def connection_count(self, app_id):
        try:
            return sum(int(v) for v in self._call(self._redis.hvals, _k(app_id, "conns")))
        except RedisDown:
            return super().connection_count(app_id)

    def remove_connection(self, conn):
        app_id = conn.app.id
        presence = {name: uid for name, uid in conn.subscriptions.items() if uid is not None}
        changes, offline = super().remove_connection(conn)
        left = [name for name, _, _ in changes]
        members = [name for name in left if name in presence]
        try:
            pipe = self._redis.pipeline(transaction=False)
            self._connections_delta(app_id, -1, pipe)
            for name in left:
                self._channel_delta(app_id, name, -1, pipe)
            for name in members:
                self._member_delta(app_id, name, presence[name], -1, pipe=pipe)
            if conn.user_id is not None:
                self._user_delta(app_id, conn.user_id, -1, pipe)
            results = self._call(pipe.execute)[1:]
        except RedisDown:
            return changes, offline
        vacated = dict(zip(left, (total <= 0 for total in results)))
        gone = dict(zip(members, (total <= 0 for total in results[len(left):])))
        if conn.user_id is not None:
            offline = conn.user_id if results[-1] <= 0 else None
        return [(name, vacated[name], presence[name] if gone.get(name) else None)
                for name in left], offline

    # ---------------------------------------------------------------- membership

    def subscribe(self, conn, channel, member=None, limit=None):
        if member is None:
            occupied, added, _ = super().subscribe(conn, channel)
            try:
                total = self._call(self._channel_delta, conn.app.id, channel, 1)
            except RedisDown:
                return occupied, added, None
            return total == 1, False, None
        app_id, node, (user_id, info) = conn.app.id, self.node, member
        try:
            result = self._call(self._eval, "join", [
                _k(app_id, "ch", channel), f"bp:node:{node}:subs", _k(app_id, "channels"),
                _k(app_id, "pu", channel), _k(app_id, "pi", channel), f"bp:node:{node}:pres"],
                [node, f"{app_id}{SEP}{channel}", channel, user_id, orjson.dumps(info),
                 f"{app_id}{SEP}{channel}{SEP}{user_id}", limit or 1 << 30])
        except RedisDown:
            return super().subscribe(conn, channel, member, limit)
        if result[0] == -1:
            raise PresenceFull(channel)
        self.hub.subscribe(conn, channel, member)  # this worker delivers to it
        pairs = result[2]
        roster = {pairs[i].decode(): orjson.loads(pairs[i + 1]) for i in range(0, len(pairs), 2)}
        return result[0] == 1, result[1] == 1, roster

    def unsubscribe(self, conn, channel):
        user_id = conn.subscriptions.get(channel)
        change = super().unsubscribe(conn, channel)
        if change is None:
            return None
        app_id = conn.app.id
        try:
            pipe = self._redis.pipeline(transaction=False)
            self._channel_delta(app_id, channel, -1, pipe)
            if user_id is not None:
                self._member_delta(app_id, channel, user_id, -1, pipe=pipe)
            results = self._call(pipe.execute)
        except RedisDown:
            return change
        removed = user_id if user_id is not None and results[1] <= 0 else None
        return channel, results[0] <= 0, removed

    def sign_in(self, conn, user_id):
        came_online = super().sign_in(conn, user_id)
        try:
            return self._call(self._user_delta, conn.app.id, user_id, 1) == 1
        except RedisDown:
            return came_online

    def user_online(self, app_id, user_id):
        try:
            return bool(self._call(self._redis.hexists, _k(app_id, "users"), user_id))
        except RedisDown:
            return super().user_online(app_id, user_id)

    # ---------------------------------------------------------------- queries

    def channel_counts(self, app_id):
        try:
            names = [n.decode() for n in self._call(self._redis.smembers,
                                                     _k(app_id, "channels"))]
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.hvals(_k(app_id, "ch", name))
                pipe.hlen(_k(app_id, "pu", name))
            values = self._call(pipe.execute)
        except RedisDown:
            return super().channel_counts(app_id)
        counts = {}
        for n, name in enumerate(names):
            subscriptions = sum(int(v) for v in values[2 * n])
            if subscriptions > 0:
                counts[name] = (subscriptions, values[2 * n + 1])
        return counts

    def subscription_count(self, app_id, channel):
        try:
            return sum(int(v) for v in self._call(self._redis.hvals, _k(app_id, "ch", channel)))
        except RedisDown:
            return super().subscription_count(app_id, channel)

    def members(self, app_id, channel):
        try:
            raw = self._call(self._redis.hgetall, _k(app_id, "pi", channel))
        except RedisDown:
            return super().members(app_id, channel)
        return {uid.decode(): orjson.loads(info) for uid, info in raw.items()}

    def member_count(self, app_id, channel):
        try:
            return self._call(self._redis.hlen, _k(app_id, "pu", channel))
        except RedisDown:
            return super().member_count(app_id, channel)

    # ---------------------------------------------------------------- cache channels

    def cache_set(self, app_id, channel, event, data, ttl):
        super().cache_set(app_id, channel, event, data, ttl)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(_k(app_id, "cache", channel), orjson.dumps([event, data]), ex=ttl)
            pipe.delete(_k(app_id, "miss", channel))
            self._call(pipe.execute)
        except RedisDown:
            pass

    def cache_get(self, app_id, channel):
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(_k(app_id, "cache", channel))
            pipe.pttl(_k(app_id, "cache", channel))
            raw, ttl_ms = self._call(pipe.execute)
        except RedisDown:
            return super().cache_get(app_id, channel)
        if raw is None:
            return None
        event, data = orjson.loads(raw)
        return event, data, max(ttl_ms, 0) / 1000

    def first_cache_miss(self, app_id, channel):
        try:
            return bool(self._call(self._redis.set, _k(app_id, "miss", channel), 1, nx=True,
                                   ex=3600))
        except RedisDown:
            return super().first_cache_miss(app_id, channel)

    # ---------------------------------------------------------------- dead nodes, outages

    def _reap_dead_nodes(self):
        cutoff = time.time() - NODE_TIMEOUT
        for raw in self._control.zrangebyscore(NODES, "-inf", cutoff):
            node = raw.decode()
            if node != self.node and self._control.set(f"bp:reap:{node}", self.node, nx=True,
                                                     ex=60):
                log.warning("node %s stopped heartbeating: removing its connections", node)
                self._apply_node_deltas(node, self._owned(node), _EMPTY, announce=True)
                self._control.delete(*(f"bp:node:{node}:{kind}"
                                     for kind in ("subs", "pres", "users", "conns")))
                self._control.zrem(NODES, node)

    def _owned(self, node):
        """What a node's index says it owns: {kind: {field: count}}."""
        pipe = self._control.pipeline(transaction=False)
        for kind in ("subs", "pres", "users", "conns"):
            pipe.hgetall(f"bp:node:{node}:{kind}")
        return {kind: {f.decode(): int(v) for f, v in raw.items()}
                for kind, raw in zip(("subs", "pres", "users", "conns"), pipe.execute())}

    def _actual(self):
        """What this node really holds, in the index's terms."""
        actual = {"subs": {}, "pres": {}, "users": {}, "conns": {}}
        for conn in self.hub.connections():
            app_id = conn.app.id
            actual["conns"][app_id] = actual["conns"].get(app_id, 0) + 1
            if conn.user_id is not None:
                key = f"{app_id}{SEP}{conn.user_id}"
                actual["users"][key] = actual["users"].get(key, 0) + 1
            for name, user_id in conn.subscriptions.items():
                key = f"{app_id}{SEP}{name}"
                actual["subs"][key] = actual["subs"].get(key, 0) + 1
                if user_id is not None:
                    key = f"{app_id}{SEP}{name}{SEP}{user_id}"
                    actual["pres"][key] = actual["pres"].get(key, 0) + 1
        return actual

    def _reconcile(self):
        """After an outage, make Redis agree with this node's sockets. What changed meanwhile
        was already announced from this node's own view, so nothing is announced again.

        Race-free without locks: while this node's index is read, _up is still False, so live
        operations touch only the hub; the hub is then snapshotted and _up set in one step (no
        yield), and every later live change goes to Redis as an increment, which commutes with
        the reconciling ones."""
        self._heartbeat_once()
        owned = self._owned(self.node)
        actual = self._actual()
        self._up = True
        self._apply_node_deltas(self.node, owned, actual, announce=False)

    def _apply_node_deltas(self, node, owned, actual, announce):
        """Move `node`'s counts in Redis from `owned` to `actual` in one pipeline; deliver and
        webhook the removals that result when `announce`."""
        pipe = self._control.pipeline(transaction=False)
        queued = []  # (kind, details, delta) in the pipeline's order

        def deltas(kind):
            for field in set(owned[kind]) | set(actual[kind]):
                delta = actual[kind].get(field, 0) - owned[kind].get(field, 0)
                if delta:
                    yield field, delta

        for app_id, delta in deltas("conns"):
            self._connections_delta(app_id, delta, pipe, node=node)
            queued.append(("conns", None, delta))
        for field, delta in deltas("subs"):
            app_id, channel = field.split(SEP, 1)
            self._channel_delta(app_id, channel, delta, pipe, node=node)
            queued.append(("subs", (app_id, channel), delta))
        for field, delta in deltas("pres"):
            app_id, channel, user_id = field.split(SEP, 2)
            info = LocalAdapter.members(self, app_id, channel).get(user_id)
            self._member_delta(app_id, channel, user_id, delta, info, pipe, node=node)
            queued.append(("pres", (app_id, channel, user_id), delta))
        for field, delta in deltas("users"):
            app_id, user_id = field.split(SEP, 1)
            self._user_delta(app_id, user_id, delta, pipe, node=node)
            queued.append(("users", (app_id, user_id), delta))
        if not queued:
            return
        results = pipe.execute()
        if not announce or self.core is None:
            return
        gone = {"subs": [], "pres": [], "users": []}
        for (kind, details, delta), total in zip(queued, results):
            if kind in gone and delta < 0 and total <= 0:
                gone[kind].append(details)
        self.core.cluster_removals(gone["subs"], gone["pres"], gone["users"])
