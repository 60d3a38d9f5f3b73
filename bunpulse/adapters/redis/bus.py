"""Pub/sub between nodes, by interest: a node subscribes to a Pusher channel's Redis channel
while it has subscribers for it (and to the control channel, always), so an event costs
nothing to the nodes that have no subscriber for its channel.

Each Redis server (one, or each master of a cluster) gets a Link: two connections and one
greenlet that writes for it. Publishes and subscription changes are queued and written in
batches: a publish never waits for Redis, and a burst of them costs one write. On a cluster,
subscriptions and publishes are sharded (SSUBSCRIBE/SPUBLISH) and go to the master that owns
the channel's slot; when that changes (failover, resharding), the links are rebuilt.
"""
import functools
import logging
import time

import gevent
import gevent.event
import redis
from redis.crc import key_slot

log = logging.getLogger("bunpulse.redis")

PING_EVERY = 1.0   # seconds between pings on an idle subscriber connection
PONG_WITHIN = 3.0  # seconds without any answer before the subscriber connection is dropped
SUBSCRIBED_WITHIN = 2.0  # seconds a new subscriber waits for its node's Redis subscription
# What an unreachable Redis or cluster raises (RedisClusterException is no RedisError).
FAILURES = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
MAX_BACKOFF = 1.0  # seconds between two attempts to reach a master again
BATCH = 200        # messages delivered at most between two reads from Redis


class Bus:
    def __init__(self, topology, node, on_event, on_control, on_down):
        self.topology = topology
        self.node = node.encode()
        self.on_event = on_event      # (app_id, channel, except_socket_id, frame, events)
        self.on_control = on_control  # (header bytes, frame)
        self.on_down = on_down        # (exception): a link failed
        self.wanted = {}              # Redis channel -> (app_id, channel), or None: control
        self.links = {}               # address -> Link
        self._running = False
        self._rebuild = gevent.event.Event()
        self._supervisor = None

    def start(self, control_channel):
        self.wanted[control_channel.encode()] = None
        self._running = True
        self._supervisor = gevent.spawn(self._supervise)

    def stop(self):
        """Stop receiving. Publishing goes on: a stopping worker may still answer requests on
        its open HTTP connections, and their events must reach the other nodes."""
        self._running = False
        if self._supervisor is not None:
            self._supervisor.kill(block=False)
        for link in self.links.values():
            link.stop_receiving()

    # ---------------------------------------------------------------- interest

    def want(self, redis_channel, target):
        """Subscribe to a Redis channel; the returned event is set once Redis has confirmed
        (or at once when Redis is unreachable: there is nothing to wait for)."""
        key = redis_channel.encode()
        self.wanted[key] = target
        link = self._link(key)
        return link.mark(key) if link is not None else _DONE

    def ready(self, redis_channel):
        """The event `want` returned, while the subscription is not confirmed yet."""
        link = self._link(redis_channel.encode())
        return link.waiters.get(redis_channel.encode(), _DONE) if link is not None else _DONE

    def drop(self, redis_channel):
        key = redis_channel.encode()
        if self.wanted.pop(key, False) is not False:
            link = self._link(key)
            if link is not None:
                link.mark(key)

    # ---------------------------------------------------------------- sending

    def publish(self, redis_channel, payload):
        """Publish without waiting. Returns False when Redis is unreachable: the message is
        dropped."""
        key = redis_channel.encode()
        link = self._link(key)
        if link is None:
            return False
        link.send((self.topology.publish_command, key, payload))
        return True

    def command(self, key, *args):
        """Send a command whose answer nobody waits for, in order with the others to the same
        key (the occupied-channel sets)."""
        link = self._link(key.encode())
        if link is not None:
            link.send(args)

    def _link(self, key):
        link = self.links.get(self.topology.address(key))
        return link if link is not None and link.up else None

    # ---------------------------------------------------------------- links

    def link_failed(self, link, exc):
        if link.up:
            link.up = False
            self.on_down(exc)
        self._rebuild.set()

    def _supervise(self):
        """Keep a link to every master: at start, and after a link failed, links to the
        masters now in charge are opened (those still up are kept) and every wanted channel
        is subscribed on the link of the master that owns it."""
        backoff = 0.1
        while self._running:
            try:
                self.topology.refresh()
                complete = self._connect()
            except FAILURES as exc:
                self.on_down(exc)
                complete = False
            if complete:
                backoff = 0.1
                self._rebuild.wait()
                self._rebuild.clear()
            else:
                gevent.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    def _connect(self):
        """Returns whether every master has its link."""
        addresses = set(self.topology.addresses())
        for address, link in list(self.links.items()):
            if address not in addresses or not link.up:
                link.close()
                del self.links[address]
        complete = True
        for address in addresses - set(self.links):
            link = Link(self, address)
            try:
                link.open()
            except FAILURES as exc:
                link.close()
                self.on_down(exc)
                complete = False
                continue
            self.links[address] = link
            link.start()
        for key in self.wanted:
            link = self.links.get(self.topology.address(key))
            if link is not None and key not in link.subscribed:
                link.mark(key)
        return complete

    def received(self, messages):
        """Deliver what the other nodes published: [(Redis channel, data)] in order. A run of
        events for one channel (with the same exclusion) goes out joined, one write per socket
        for all of them, as the hub joins the frames that queue behind a big fan-out."""
        run, frames = None, []
        for redis_channel, data in messages:
            if data[:16] == self.node:
                continue  # this node's own message: it delivered its share before publishing
            target = self.wanted.get(redis_channel, False)
            header, _, frame = data[16:].partition(b"\n")
            if target is False:
                continue
            if target is None:
                self.on_control(header, frame)
                continue
            if (target, header) != run:
                if frames:
                    self._deliver(run, frames)
                run, frames = (target, header), []
            frames.append(frame)
        if frames:
            self._deliver(run, frames)

    def _deliver(self, run, frames):
        (app_id, channel), header = run
        self.on_event(app_id, channel, header.decode() or None,
                      frames[0] if len(frames) == 1 else b"".join(frames), len(frames))


class _Done:
    @staticmethod
    def wait(timeout=None):
        return True


_DONE = _Done()


class Link:
    """One Redis server: a connection that publishes (and sends the other unanswered
    commands) and a connection that receives; one greenlet writes both, one reads."""

    def __init__(self, bus, address):
        self.bus = bus
        self.topology = bus.topology
        self.address = address
        self.up = False
        self.outgoing = []   # commands to write, in order
        self.dirty = {}      # Redis channels whose subscription may need a change (ordered)
        self.subscribed = set()
        self.unsubscribing = {}  # Redis channel -> unsubscriptions sent, not yet confirmed
        self.waiters = {}    # Redis channel -> Event set on its subscription's confirmation
        self.wake = gevent.event.Event()
        self.last_heard = time.monotonic()
        self.receiving = True
        self.greenlets = []
        self.writer = self.topology.connect(address, timeout=3)
        self.reader = self.topology.connect(address, timeout=None)

    def open(self):
        self.writer.connect()
        self.reader.connect()
        self.up = True

    def start(self):
        self.greenlets = [gevent.spawn(self._write), gevent.spawn(self._read)]
        self.wake.set()

    def close(self):
        self.up = False
        gevent.killall(self.greenlets, block=False)
        for conn in (self.writer, self.reader):
            conn.disconnect()
        for waiter in self.waiters.values():
            waiter.set()
        self.waiters = {}

    def stop_receiving(self):
        self.receiving = False
        gevent.killall(self.greenlets[1:], block=False)
        self.reader.disconnect()

    def mark(self, key):
        self.dirty[key] = None
        self.wake.set()
        if key not in self.bus.wanted:
            # Dropped: a subscription the writer had not sent yet never will be, and nothing
            # would ever confirm it; its waiter must not stay behind for a name a client made up.
            waiter = self.waiters.pop(key, None)
            if waiter is not None:
                waiter.set()
        elif key not in self.subscribed:
            waiter = self.waiters.get(key)
            if waiter is None:
                waiter = self.waiters[key] = gevent.event.Event()
            return waiter
        return _DONE

    def send(self, command):
        self.outgoing.append(command)
        self.wake.set()

    def _write(self):
        topology = self.topology
        try:
            while True:
                if not self.wake.wait(PING_EVERY):
                    if not self.receiving:
                        continue
                    if time.monotonic() - self.last_heard > PONG_WITHIN:
                        raise redis.ConnectionError(f"no answer from {self.address}")
                    self.reader.send_packed_command(self.reader.pack_command("PING"), False)
                    continue
                self.wake.clear()
                if self.dirty and self.receiving:
                    changes = []
                    for key in self.dirty:
                        if key in self.bus.wanted and key not in self.subscribed:
                            self.subscribed.add(key)
                            changes.append((topology.subscribe_command, key))
                        elif key not in self.bus.wanted and key in self.subscribed:
                            self.subscribed.discard(key)
                            self.unsubscribing[key] = self.unsubscribing.get(key, 0) + 1
                            changes.append((topology.unsubscribe_command, key))
                    self.dirty = {}
                    if changes:
                        self.reader.send_packed_command(self.reader.pack_commands(changes),
                                                        False)
                if self.outgoing:
                    batch, self.outgoing = self.outgoing, []
                    self.writer.send_packed_command(self.writer.pack_commands(batch), False)
                    for _ in batch:
                        try:
                            self.writer.read_response()
                        except redis.ResponseError as exc:
                            if self.topology.moved(exc):
                                raise
                            log.warning("Redis refused a command: %s", exc)
        except FAILURES as exc:
            self.bus.link_failed(self, exc)

    def _read(self):
        read = functools.partial(self.reader.read_response, disconnect_on_error=False)
        # hiredis says whether more replies wait in its buffer: those are read without a
        # syscall, and delivered together
        buffered = getattr(getattr(self.reader._parser, "_reader", None), "has_data",
                           lambda: False)
        message, subscribed = self.topology.message_kind, self.topology.subscribed_kind
        unsubscribed = self.topology.unsubscribed_kind
        try:
            while True:
                reply = read()
                self.last_heard = time.monotonic()
                messages = []
                while True:
                    kind = reply[0]
                    if kind == message:
                        messages.append((reply[1], reply[2]))
                    elif kind == subscribed:
                        waiter = self.waiters.pop(reply[1], None)
                        if waiter is not None:
                            waiter.set()
                    elif kind == unsubscribed:
                        self._unsubscribed(reply[1])
                    if len(messages) >= BATCH or not buffered():
                        break
                    reply = read()
                if messages:
                    self.bus.received(messages)
                if len(messages) >= BATCH:
                    gevent.sleep(0)  # a burst from Redis must not starve the sockets
        except FAILURES as exc:
            if self.receiving:  # else stop_receiving closed the connection under it
                self.bus.link_failed(self, exc)
        except Exception:  # noqa: BLE001 - one bad message must not stop the node's relay
            log.exception("Redis reader failed; reconnecting")
            self.bus.link_failed(self, redis.ConnectionError("reader failed"))

    def _unsubscribed(self, key):
        pending = self.unsubscribing.pop(key, 0)
        if pending > 1:
            self.unsubscribing[key] = pending - 1
        elif not pending and key in self.subscribed:
            # Not asked for: the slot moved to another master (cluster).
            raise redis.ConnectionError(f"{key!r} moved away from {self.address}")


class SingleRedis:
    """One Redis server (or a primary behind one address): classic pub/sub."""
    publish_command, subscribe_command, unsubscribe_command = "PUBLISH", "SUBSCRIBE", \
        "UNSUBSCRIBE"
    message_kind, subscribed_kind, unsubscribed_kind = b"message", b"subscribe", b"unsubscribe"

    def __init__(self, url):
        self.url = url

    def refresh(self):
        pass

    def addresses(self):
        return [self.url]

    def address(self, key):
        return self.url

    # RESP2: under RESP3, redis-py hands pub/sub messages to push handlers instead of
    # returning them from read_response.
    def connect(self, address, timeout):
        return redis.ConnectionPool.from_url(
            address, socket_connect_timeout=1, socket_timeout=timeout,
            socket_keepalive=True, protocol=2).make_connection()

    @staticmethod
    def moved(exc):
        return False


class RedisClusterTopology:
    """A Redis Cluster: sharded pub/sub, each channel on the master that owns its slot."""
    publish_command, subscribe_command, unsubscribe_command = "SPUBLISH", "SSUBSCRIBE", \
        "SUNSUBSCRIBE"
    message_kind, subscribed_kind, unsubscribed_kind = b"smessage", b"ssubscribe", \
        b"sunsubscribe"

    def __init__(self, client):
        self.client = client  # a redis.RedisCluster: its slot map is the truth
        self._masters = {}    # slot -> address

    def refresh(self):
        self.client.nodes_manager.initialize()
        slots = self.client.nodes_manager.slots_cache
        self._masters = {slot: nodes[0].name for slot, nodes in slots.items() if nodes}

    def addresses(self):
        return sorted(set(self._masters.values()))

    def address(self, key):
        return self._masters.get(key_slot(key))

    def connect(self, address, timeout):
        node = self.client.get_node(node_name=address)
        kwargs = dict(self.client.get_redis_connection(node).connection_pool.connection_kwargs)
        kwargs.update(socket_connect_timeout=1, socket_timeout=timeout, socket_keepalive=True,
                      health_check_interval=0, protocol=2)
        return redis.Connection(**kwargs)

    @staticmethod
    def moved(exc):
        return isinstance(exc, (redis.exceptions.MovedError, redis.exceptions.AskError,
                                redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError))
