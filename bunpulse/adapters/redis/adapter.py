"""The Redis adapter: several workers and machines behave as one server.

- Delivery: a node delivers to its own sockets first, then publishes the prebuilt frame on the
  Pusher channel's Redis channel, which only the nodes with subscribers for it listen to
  (bus.py). Local delivery therefore survives a Redis outage.
- Shared state: per-channel subscription counts, presence members, signed-in users and
  connection counts live in Redis hashes, each count split by the node that owns it
  (scripts.py). Lua scripts change a count and report the deployment-wide transition
  (occupied, vacated, member added or removed, user online or offline) atomically, so each
  transition, and its webhook, happens exactly once.
- Liveness, dead nodes and outages: nodes.py.
- Redis Cluster (`redis_cluster`): the same keys and scripts, each on one slot; sharded pub/sub.
"""
import contextlib
import functools
import logging
import secrets

import orjson
import redis

from ...config import redacted
from ...hub import Left
from ...errors import PresenceFull
from ..local import LocalAdapter
from .bus import FAILURES, SUBSCRIBED_WITHIN, Bus, RedisClusterTopology, SingleRedis
from .nodes import Nodes
from .scripts import MISS_TTL, SCRIPTS, Keys

log = logging.getLogger("bunpulse.redis")

# In place of the excluded socket id of a message between nodes (socket ids are digits and a
# dot): "a channel's subscription count changed", with no frame (subscription_counts.py).
COUNT_NOTICE = "count"

POOL_SIZE = 128         # Redis connections a worker holds at most (plus its pub/sub links)
POOL_WAIT = 30.0        # seconds a call may wait for a free connection


class RedisDown(Exception):
    """Redis is unreachable: the node answers from its own hub until it is back."""


def or_local(method):
    """A query answered by Redis, or by this node's hub (LocalAdapter's method of the same
    name) while Redis is unreachable."""
    local = getattr(LocalAdapter, method.__name__)

    @functools.wraps(method)
    def query(self, *args):
        with self.tolerant():
            return method(self, *args)
        return local(self, *args)
    return query


def connect(settings):
    """(client for the requests, client for heartbeats and reaping, pub/sub topology)."""
    options = dict(socket_connect_timeout=1, socket_timeout=3)
    # A blocking pool: hundreds of greenlets may call at once, and redis-py's default pool
    # refuses the 101st ("Too many connections") instead of making it wait. A busy worker can
    # keep a greenlet waiting for a connection for seconds: that is congestion, not an
    # outage, so the wait is long; a Redis that stops answering still fails fast through the
    # socket timeouts of the connections in use.
    pooled = dict(options, max_connections=POOL_SIZE, timeout=POOL_WAIT)
    if settings.redis_cluster:
        cluster = functools.partial(redis.RedisCluster.from_url, settings.redis_url)
        return (cluster(connection_pool_class=redis.BlockingConnectionPool, **pooled),
                cluster(**options), RedisClusterTopology(cluster(**options)))
    pool = redis.BlockingConnectionPool.from_url(settings.redis_url, health_check_interval=10,
                                                 **pooled)
    # Heartbeats and reaping on a connection of their own: a worker whose pool is busy must
    # never look dead to the others.
    return (redis.Redis(connection_pool=pool), redis.Redis.from_url(settings.redis_url, **options),
            SingleRedis(settings.redis_url))


class RedisAdapter(LocalAdapter):
    def __init__(self, hub, settings):
        super().__init__(hub)
        self.url = settings.redis_url
        self.node = secrets.token_hex(8)
        self.keys = Keys(settings.redis_key_prefix)  # every key and channel of this deployment
        self.core = None
        self._redis, self.control, topology = connect(settings)
        self.bus = Bus(topology, self.node, self._on_event, self._on_control, self._link_down)
        self.nodes = Nodes(self)
        self._header = self.node.encode()
        self._metrics = hub.metrics
        self.up = False

    # ---------------------------------------------------------------- life cycle

    def bind(self, core):
        self.core = core

    def start(self):
        self.bus.start(self.keys.CONTROL)
        self.nodes.start()
        log.info("Redis adapter: node %s on %s%s", self.node, redacted(self.url),
                 " (cluster)" if isinstance(self.bus.topology, RedisClusterTopology) else "")

    def stop(self):
        # The node stays in NODES: what its closing sockets do not clean up themselves is
        # reaped by the survivors once its heartbeat stops.
        self.nodes.stop()
        self.bus.stop()

    @property
    def up(self):
        return self._up

    @up.setter
    def up(self, up):
        self._up = up
        self._metrics.redis_up.set(1 if up else 0)

    def ready(self):
        return self.up

    @property
    def redis(self):
        if not self.up:
            raise RedisDown()
        return self._redis

    def _link_down(self, exc):
        self._metrics.redis_relay_errors.inc()
        self.down(exc)

    def down(self, exc):
        if self.up:
            self.up = False
            log.error("lost Redis (%s): serving this node's sockets alone; reconnecting", exc)

    @contextlib.contextmanager
    def tolerant(self):
        """Run a block against Redis; if Redis is (or goes) down, skip the rest of it: the
        caller keeps the answer it had from its own hub."""
        try:
            yield
        except RedisDown:
            pass
        except FAILURES as exc:
            self.down(exc)

    def eval(self, name, keys, args, pipe=None):
        # execute_command: redis-py's cluster pipeline refuses its own evalsha method, though
        # it routes the command by its keys like any other
        return (pipe if pipe is not None else self.redis).execute_command(
            "EVALSHA", SCRIPTS[name][1], len(keys), *keys, *args)

    def lease(self, app_id, kind, second, wanted, limit):
        with self.tolerant():
            return self.eval("lease", [self.keys.rate(app_id, kind, second)], [wanted, limit])
        return None  # Redis is down: this worker counts alone until it is back

    # ---------------------------------------------------------------- interest

    def _occupied_here(self, app_id, channel):
        """This node got its first subscriber for a channel: listen to it."""
        self.bus.command(self.keys.occupied(app_id, self.node), "SADD",
                         self.keys.occupied(app_id, self.node), channel)
        return self.bus.want(self.keys.events(app_id, channel), (app_id, channel))

    def _vacated_here(self, app_id, channel):
        self.bus.drop(self.keys.events(app_id, channel))
        self.bus.command(self.keys.occupied(app_id, self.node), "SREM",
                         self.keys.occupied(app_id, self.node), channel)

    # ---------------------------------------------------------------- delivery

    def publish(self, app_id, channel, frame, except_socket_id=None):
        count = self.hub.broadcast(app_id, channel, frame, except_socket_id)  # this node
        if not self.bus.publish(self.keys.events(app_id, channel), b"%s%s\n%s" % (
                self._header, (except_socket_id or "").encode(), frame)):
            self._metrics.redis_relay_errors.inc()  # the others miss it; this node delivered
        return count

    def count_changed(self, app_id, channel):
        if not self.bus.publish(self.keys.events(app_id, channel),
                                b"%s%s\n" % (self._header, COUNT_NOTICE.encode())):
            self._metrics.redis_relay_errors.inc()

    def tell_watchers(self, app_id, user_id, frame):
        super().tell_watchers(app_id, user_id, frame)
        self._control("watch", app_id, user_id, frame)

    def terminate_user(self, app_id, user_id):
        super().terminate_user(app_id, user_id)
        self._control("terminate", app_id, user_id)

    def _control(self, kind, app_id, user_id, frame=b""):
        if not self.bus.publish(self.keys.CONTROL, self._header +
                                orjson.dumps([kind, app_id, user_id]) + b"\n" + frame):
            self._metrics.redis_relay_errors.inc()

    def _on_event(self, app_id, channel, except_socket_id, frame, events):
        if except_socket_id == COUNT_NOTICE:
            self.core.counts.changed_elsewhere(app_id, channel)
            return
        self.hub.broadcast(app_id, channel, frame, except_socket_id, events)

    def _on_control(self, header, frame):
        kind, app_id, user_id = orjson.loads(header)
        if kind == "watch":
            super().tell_watchers(app_id, user_id, frame)
        elif kind == "terminate":
            super().terminate_user(app_id, user_id)

    # ---------------------------------------------------------------- shared counters

    # Each takes the node whose share changes: this one, or a dead one being reaped.

    def channel_delta(self, app_id, channel, delta, pipe=None, node=None):
        return self.eval("channel", [self.keys.subscriptions(app_id, channel),
                                     self.keys.cache_miss(app_id, channel)],
                         [node or self.node, delta], pipe)

    def member_delta(self, app_id, channel, user_id, delta, info=None, pipe=None, node=None):
        return self.eval("member", [self.keys.members(app_id, channel),
                                    self.keys.node_members(app_id, channel, node or self.node),
                                    self.keys.member_infos(app_id, channel)],
                         [user_id, delta, orjson.dumps(info)], pipe)

    def user_delta(self, app_id, user_id, delta, pipe=None, node=None):
        return self.eval("member", [self.keys.users(app_id), self.keys.node_users(app_id, node or self.node)],
                         [user_id, delta, ""], pipe)

    def connections_delta(self, app_id, delta, pipe=None, node=None):
        return self.eval("counter", [self.keys.connections(app_id)], [node or self.node, delta], pipe)

    # ---------------------------------------------------------------- connections

    def add_connection(self, conn):
        super().add_connection(conn)
        with self.tolerant():
            self.connections_delta(conn.app.id, 1)

    @or_local
    def connection_count(self, app_id):
        return sum(int(v) for v in self.redis.hvals(self.keys.connections(app_id)))

    def remove_connection(self, conn):
        app_id = conn.app.id
        presence = {name: uid for name, uid in conn.subscriptions.items() if uid is not None}
        changes, offline = super().remove_connection(conn)
        for change in changes:
            if change.vacated:
                self._vacated_here(app_id, change.channel)
        with self.tolerant():
            pipe = self.redis.pipeline(transaction=False)
            self.connections_delta(app_id, -1, pipe)
            for change in changes:
                self._leave(app_id, change.channel, presence.get(change.channel), pipe)
            if conn.user_id is not None:
                self.user_delta(app_id, conn.user_id, -1, pipe)
            results = pipe.execute()
            changes = [self._left(change.channel, presence.get(change.channel), result)
                       for change, result in zip(changes, results[1:])]
            if conn.user_id is not None:
                offline = conn.user_id if results[-1] <= 0 else None
        return changes, offline

    def _leave(self, app_id, channel, user_id, pipe=None):
        if user_id is None:
            return self.channel_delta(app_id, channel, -1, pipe)
        return self.eval("leave", [self.keys.subscriptions(app_id, channel),
                                   self.keys.members(app_id, channel),
                                   self.keys.node_members(app_id, channel, self.node),
                                   self.keys.member_infos(app_id, channel),
                                   self.keys.cache_miss(app_id, channel)],
                         [self.node, user_id], pipe)

    @staticmethod
    def _left(channel, user_id, result):
        """The deployment-wide Left, from _leave's answer."""
        if user_id is None:
            return Left(channel, result <= 0, None)
        total, user_total = result
        return Left(channel, total <= 0, user_id if user_total <= 0 else None)

    # ---------------------------------------------------------------- membership

    def subscribe(self, conn, channel, member=None, limit=None):
        app_id = conn.app.id
        events = self.keys.events(app_id, channel)
        if member is None:
            occupied, added, roster = super().subscribe(conn, channel)
            subscribed = self._occupied_here(app_id, channel) if occupied else \
                self.bus.ready(events)
            with self.tolerant():
                occupied, added = self.channel_delta(app_id, channel, 1) == 1, False
            subscribed.wait(SUBSCRIBED_WITHIN)
            return occupied, added, roster
        user_id, info = member
        result = None
        with self.tolerant():
            result = self.eval("join", [
                self.keys.subscriptions(app_id, channel), self.keys.members(app_id, channel),
                self.keys.node_members(app_id, channel, self.node), self.keys.member_infos(app_id, channel)],
                [self.node, user_id, orjson.dumps(info), limit or 1 << 30])
        if result is None:  # Redis is down: this node's own view
            occupied, added, roster = super().subscribe(conn, channel, member, limit)
            if occupied:
                self._occupied_here(app_id, channel)
            return occupied, added, roster
        if result[0] == -1:
            raise PresenceFull(channel)
        here, _ = self.hub.subscribe(conn, channel, member)  # this node delivers to it
        (self._occupied_here(app_id, channel) if here else self.bus.ready(events)).wait(
            SUBSCRIBED_WITHIN)
        pairs = result[2]
        roster = {pairs[i].decode(): orjson.loads(pairs[i + 1]) for i in range(0, len(pairs), 2)}
        return result[0] == 1, result[1] == 1, roster

    def unsubscribe(self, conn, channel):
        user_id = conn.subscriptions.get(channel)
        change = super().unsubscribe(conn, channel)
        if change is None:
            return None
        if change.vacated:
            self._vacated_here(conn.app.id, channel)
        with self.tolerant():
            change = self._left(channel, user_id, self._leave(conn.app.id, channel, user_id))
        return change

    def sign_in(self, conn, user_id):
        came_online = super().sign_in(conn, user_id)
        with self.tolerant():
            came_online = self.user_delta(conn.app.id, user_id, 1) == 1
        return came_online

    @or_local
    def user_online(self, app_id, user_id):
        return bool(self.redis.hexists(self.keys.users(app_id), user_id))

    # ---------------------------------------------------------------- queries

    @or_local
    def channel_counts(self, app_id):
        nodes = {n.decode() for n in self.redis.zrange(self.keys.NODES, 0, -1)} | {self.node}
        names = [n.decode() for n in self.redis.sunion(
            [self.keys.occupied(app_id, node) for node in sorted(nodes)])]
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hvals(self.keys.subscriptions(app_id, name))
            pipe.hlen(self.keys.members(app_id, name))
        values = pipe.execute()
        counts = {}
        for n, name in enumerate(names):
            subscriptions = sum(int(v) for v in values[2 * n])
            if subscriptions > 0:
                counts[name] = (subscriptions, values[2 * n + 1])
        return counts

    @or_local
    def subscription_count(self, app_id, channel):
        return sum(int(v) for v in self.redis.hvals(self.keys.subscriptions(app_id, channel)))

    @or_local
    def members(self, app_id, channel):
        raw = self.redis.hgetall(self.keys.member_infos(app_id, channel))
        return {uid.decode(): orjson.loads(info) for uid, info in raw.items()}

    @or_local
    def member_count(self, app_id, channel):
        return self.redis.hlen(self.keys.members(app_id, channel))

    # ---------------------------------------------------------------- cache channels

    def cache_set(self, app_id, channel, event, data, ttl):
        super().cache_set(app_id, channel, event, data, ttl)
        with self.tolerant():
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self.keys.cache(app_id, channel), orjson.dumps([event, data]), ex=ttl)
            pipe.delete(self.keys.cache_miss(app_id, channel))
            pipe.execute()

    @or_local
    def cache_get(self, app_id, channel):
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.cache(app_id, channel))
        pipe.pttl(self.keys.cache(app_id, channel))
        raw, ttl_ms = pipe.execute()
        if raw is None:
            return None
        event, data = orjson.loads(raw)
        return event, data, max(ttl_ms, 0) / 1000

    @or_local
    def first_cache_miss(self, app_id, channel):
        return self.eval("miss", [self.keys.subscriptions(app_id, channel),
                                  self.keys.cache_miss(app_id, channel)], [MISS_TTL]) == 1
