"""Node liveness and recovery.

- Heartbeats: every node writes the time into a sorted set each HEARTBEAT seconds.
- Reaping: a node silent for NODE_TIMEOUT seconds is reaped by one survivor (a SET NX lock):
  its counts are removed through the same scripts as live changes, and the resulting vacated,
  member_removed and offline events are delivered and webhooked once.
- Outages: while Redis is unreachable the node serves its own sockets from its hub; this loop
  reconnects with backoff and reconciles what the node owns into Redis.
"""
import logging
import time

import gevent
import redis

from ...hub import Left
from ..local import LocalAdapter
from .bus import FAILURES
from .scripts import SCRIPTS, SEP

log = logging.getLogger("bunpulse.redis")

NODE_TIMEOUT = 10.0     # seconds without a heartbeat before a node is reaped
HEARTBEAT = 1.0
REAP_EVERY = 2.0
KINDS = ("conns", "users", "subs", "pres")  # what a node owns, in its index's terms


class Nodes:
    def __init__(self, adapter):
        self.adapter = adapter
        self.control = adapter.control  # a connection of its own: a busy pool never delays
        self.node = adapter.node        # a heartbeat
        self.keys = adapter.keys
        self._greenlet = None

    def start(self):
        try:
            self.load_scripts()
            self.heartbeat()
            self.adapter.up = True
        except FAILURES as exc:
            log.error("Redis at %s is unreachable (%s): serving this node's sockets alone "
                      "until it answers", self.adapter.url, exc)
        self._greenlet = gevent.spawn(self._keep_alive)

    def stop(self):
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def _keep_alive(self):
        """Heartbeat, reap dead nodes, and come back after an outage."""
        backoff, last_reap = 0.2, 0.0
        adapter = self.adapter
        while True:
            if not adapter.up:
                try:
                    self.load_scripts()
                    log.info("Redis is back: reconciling this node's state")
                    self.reconcile()  # sets adapter.up at the right moment
                except FAILURES as exc:
                    adapter.down(exc)
                    gevent.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.2
            try:
                if self.heartbeat():
                    # Reaped by the others (this node stalled past NODE_TIMEOUT): count its
                    # sockets in again.
                    log.warning("this node was taken for dead: reconciling its state")
                    adapter.up = False
                    continue
                if time.monotonic() - last_reap >= REAP_EVERY:
                    last_reap = time.monotonic()
                    self.reap_dead_nodes()
            except FAILURES as exc:
                adapter.down(exc)
            except Exception:  # noqa: BLE001
                log.exception("Redis keep-alive failed")
            gevent.sleep(HEARTBEAT)

    def heartbeat(self):
        """Returns True when this node was missing from NODES (first beat, or reaped)."""
        return self.control.zadd(self.keys.NODES, {self.node: time.time()}) == 1

    def load_scripts(self):
        # Called by EVALSHA alone afterwards; a Redis that restarted (or a replica promoted
        # in a cluster) answers NOSCRIPT, which counts as an outage: this loads them again.
        for source, _ in SCRIPTS.values():
            self.control.script_load(source)

    def _apps(self):
        core = self.adapter.core
        return [app.id for app in core.apps] if core is not None else []

    # ---------------------------------------------------------------- dead nodes

    def reap_dead_nodes(self):
        cutoff = time.time() - NODE_TIMEOUT
        for raw in self.control.zrangebyscore(self.keys.NODES, "-inf", cutoff):
            node = raw.decode()
            if node != self.node and self.control.set(self.keys.reap_lock(node), self.node,
                                                      nx=True, ex=60):
                log.warning("node %s stopped heartbeating: removing its connections", node)
                self.apply(node, self.owned(node), {kind: {} for kind in KINDS}, announce=True)
                for app_id in self._apps():
                    self.control.delete(self.keys.occupied(app_id, node))
                self.control.zrem(self.keys.NODES, node)

    def owned(self, node, also=()):
        """What Redis counts for a node: {kind: {field: count}}, over the channels in its
        occupied sets and `also` ((app_id, channel) pairs)."""
        apps = self._apps()
        pipe = self.control.pipeline(transaction=False)
        for app_id in apps:
            pipe.hget(self.keys.connections(app_id), node)
            pipe.hgetall(self.keys.node_users(app_id, node))
            pipe.smembers(self.keys.occupied(app_id, node))
        answers = pipe.execute()
        owned = {kind: {} for kind in KINDS}
        channels = set(also)
        for n, app_id in enumerate(apps):
            conns, users, occupied = answers[3 * n:3 * n + 3]
            if conns:
                owned["conns"][app_id] = int(conns)
            for user, count in users.items():
                owned["users"][f"{app_id}{SEP}{user.decode()}"] = int(count)
            channels.update((app_id, name.decode()) for name in occupied)
        channels = sorted(channels)
        pipe = self.control.pipeline(transaction=False)
        for app_id, channel in channels:
            pipe.hget(self.keys.subscriptions(app_id, channel), node)
            pipe.hgetall(self.keys.node_members(app_id, channel, node))
        answers = pipe.execute()
        for n, (app_id, channel) in enumerate(channels):
            subs, members = answers[2 * n:2 * n + 2]
            if subs:
                owned["subs"][f"{app_id}{SEP}{channel}"] = int(subs)
            for user, count in members.items():
                owned["pres"][f"{app_id}{SEP}{channel}{SEP}{user.decode()}"] = int(count)
        return owned

    def actual(self):
        """What this node really holds, in the same terms."""
        actual = {kind: {} for kind in KINDS}

        def count(kind, field):
            actual[kind][field] = actual[kind].get(field, 0) + 1

        for conn in self.adapter.hub.connections():
            app_id = conn.app.id
            count("conns", app_id)
            if conn.user_id is not None:
                count("users", f"{app_id}{SEP}{conn.user_id}")
            for name, user_id in conn.subscriptions.items():
                count("subs", f"{app_id}{SEP}{name}")
                if user_id is not None:
                    count("pres", f"{app_id}{SEP}{name}{SEP}{user_id}")
        return actual

    # ---------------------------------------------------------------- outages

    def reconcile(self):
        """After an outage, make Redis agree with this node's sockets. What changed meanwhile
        was already announced from this node's own view, so nothing is announced again.

        Race-free without locks: while this node's share is read, adapter.up is still False,
        so live operations touch only the hub; the hub is then snapshotted and adapter.up set
        in one step (no yield), and every later live change goes to Redis as an increment,
        which commutes with the reconciling ones."""
        self.heartbeat()
        held = {tuple(field.split(SEP, 1)) for field in self.actual()["subs"]}
        owned = self.owned(self.node, also=held)
        actual = self.actual()
        self.adapter.up = True
        self.apply(self.node, owned, actual, announce=False)
        pipe = self.control.pipeline(transaction=False)
        for field in actual["subs"]:
            app_id, channel = field.split(SEP, 1)
            pipe.sadd(self.keys.occupied(app_id, self.node), channel)
        pipe.execute()

    def apply(self, node, owned, actual, announce):
        """Move `node`'s counts in Redis from `owned` to `actual` in one pipeline; deliver and
        webhook the removals that result when `announce`."""
        adapter = self.adapter
        pipe = self.control.pipeline(transaction=False)
        queued = []  # (kind, details, delta) in the pipeline's order

        def deltas(kind):
            for field in set(owned[kind]) | set(actual[kind]):
                delta = actual[kind].get(field, 0) - owned[kind].get(field, 0)
                if delta:
                    yield field, delta

        for app_id, delta in deltas("conns"):
            adapter.connections_delta(app_id, delta, pipe, node=node)
            queued.append(("conns", None, delta))
        for field, delta in deltas("subs"):
            app_id, channel = field.split(SEP, 1)
            adapter.channel_delta(app_id, channel, delta, pipe, node=node)
            queued.append(("subs", (app_id, channel), delta))
        for field, delta in deltas("pres"):
            app_id, channel, user_id = field.split(SEP, 2)
            info = LocalAdapter.members(adapter, app_id, channel).get(user_id)
            adapter.member_delta(app_id, channel, user_id, delta, info, pipe, node=node)
            queued.append(("pres", (app_id, channel, user_id), delta))
        for field, delta in deltas("users"):
            app_id, user_id = field.split(SEP, 1)
            adapter.user_delta(app_id, user_id, delta, pipe, node=node)
            queued.append(("users", (app_id, user_id), delta))
        if not queued:
            return
        results = pipe.execute()
        if not announce or adapter.core is None:
            return
        left, offline, recounted = [], [], []
        for (kind, details, delta), total in zip(queued, results):
            if kind == "subs" and delta < 0 and total > 0:
                recounted.append(details)
            if delta >= 0 or total > 0:
                continue
            if kind == "subs":
                app_id, channel = details
                left.append((app_id, Left(channel, True, None)))
            elif kind == "pres":
                app_id, channel, user_id = details
                left.append((app_id, Left(channel, False, user_id)))
            elif kind == "users":
                offline.append(details)
        # member_removed before channel_vacated, as when the members leave one by one
        left.sort(key=lambda item: item[1].vacated)
        adapter.core.cluster_removals(left, offline)
        adapter.core.cluster_recounted(recounted)
