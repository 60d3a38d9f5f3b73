"""One worker's channels, sockets, presence members and signed-in users.

The hub holds state and delivers prebuilt frames; it knows nothing of JSON or Redis. Every
state change returns what changed (occupied, vacated, member added or removed, user online or
offline) as values, for the adapter to turn into deployment-wide events and webhooks.
"""
import time
from collections import deque, namedtuple

import gevent

from .metrics import Metrics
from .outbox import in_the_loop

YIELD_EVERY = 256  # sockets served between two yields while fanning out to a big channel

# What a subscription's end changed: the channel, whether it became empty, and the presence
# user who left it (None if the user is still there through another connection, or none).
Left = namedtuple("Left", "channel vacated removed")


class Channel:
    __slots__ = ("name", "subscribers", "members", "queue", "sending", "missed")

    def __init__(self, name):
        self.name = name
        self.subscribers = {}   # connection -> its outbox's send, to skip two lookups a delivery
        self.members = {}       # presence: user_id -> [user_info, local connection count]
        self.queue = None       # frames waiting while a big fan-out yields: a deque made
                                # when needed (an empty one is large)
        self.sending = False
        # Cache channels: a miss was reported since the last event. Kept here, not in a set of
        # names, so that it goes with the channel's last subscriber: names that clients
        # make up cannot pile up.
        self.missed = False


class AppState:
    __slots__ = ("channels", "connections", "users", "watchers", "cache", "cache_writes", "messages_in", "messages_out", "api_calls")

    def __init__(self):
        self.channels = {}     # name -> Channel (occupied ones only)
        self.connections = {}  # socket_id -> connection
        self.users = {}        # signed-in user_id -> {connection: None}
        self.watchers = {}     # watched user_id -> {connection: None}
        self.cache = {}        # cache channel -> (event, data, expires_at)
        self.cache_writes = 0  # since expired entries were last swept
        # Running totals for the dashboard's charts: one addition per message, publish or
        # call, never one per delivery.
        self.messages_in = 0   # client WebSocket messages received
        self.messages_out = 0  # frames delivered to subscribers
        self.api_calls = 0     # HTTP API calls


class Hub:
    def __init__(self, metrics=None):
        self._apps = {}
        self.metrics = metrics if metrics is not None else Metrics(enabled=False)

    def states(self):
        """[(app id, AppState)] of every app this worker has seen."""
        return list(self._apps.items())

    def app(self, app_id):
        state = self._apps.get(app_id)
        if state is None:
            state = self._apps[app_id] = AppState()
        return state

    # ---------------------------------------------------------------- connections

    def add_connection(self, conn):
        self.app(conn.app.id).connections[conn.socket_id] = conn

    def connection_count(self, app_id):
        state = self._apps.get(app_id)
        return len(state.connections) if state else 0

    def connections(self, app_id=None):
        states = self._apps.values() if app_id is None else [self.app(app_id)]
        return [conn for state in states for conn in state.connections.values()]

    def remove_connection(self, conn):
        """Forget a closed connection; return (channel changes, user went offline)."""
        state = self.app(conn.app.id)
        state.connections.pop(conn.socket_id, None)
        changes = [self.unsubscribe(conn, name) for name in list(conn.subscriptions)]
        offline = self.sign_out(conn)
        return [c for c in changes if c is not None], offline

    # ---------------------------------------------------------------- channels

    def subscribe(self, conn, name, member=None):
        """Add conn to a channel; member is (user_id, user_info) for presence.
        Returns (occupied, member_added): whether this worker's channel became occupied and
        whether the user is new to it here."""
        channels = self.app(conn.app.id).channels
        channel = channels.get(name)
        occupied = channel is None
        if occupied:
            channel = channels[name] = Channel(name)
        channel.subscribers[conn] = conn.outbox.send
        conn.subscriptions[name] = None if member is None else member[0]
        metrics = self.metrics.app(conn.app.id)
        metrics.subscriptions.inc()
        if occupied:
            metrics.channels.inc()
        added = False
        if member is not None:
            user_id, user_info = member
            entry = channel.members.get(user_id)
            if entry is None:
                channel.members[user_id] = [user_info, 1]
                added = True
            else:
                entry[1] += 1
        return occupied, added

    def unsubscribe(self, conn, name):
        """Remove conn from a channel; None if it was not subscribed, else
        Left(name, vacated, removed user_id or None)."""
        if name not in conn.subscriptions:
            return None
        user_id = conn.subscriptions.pop(name)
        channels = self.app(conn.app.id).channels
        channel = channels.get(name)
        if channel is None:
            return None
        channel.subscribers.pop(conn, None)
        metrics = self.metrics.app(conn.app.id)
        metrics.subscriptions.dec()
        removed = None
        if user_id is not None:
            entry = channel.members.get(user_id)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del channel.members[user_id]
                    removed = user_id
        vacated = not channel.subscribers
        if vacated:
            del channels[name]
            metrics.channels.dec()
        return Left(name, vacated, removed)

    def channel(self, app_id, name):
        state = self._apps.get(app_id)
        return state.channels.get(name) if state else None

    def channels(self, app_id):
        state = self._apps.get(app_id)
        return state.channels if state else {}

    def has_member(self, app_id, name, user_id):
        channel = self.channel(app_id, name)
        return channel is not None and user_id in channel.members

    # ---------------------------------------------------------------- delivery

    def broadcast(self, app_id, name, frame, except_socket_id=None, events=1):
        """Send a prebuilt WebSocket frame (or `events` frames joined) to a channel's
        subscribers here. Return to how many."""
        state = self._apps.get(app_id)
        channel = state.channels.get(name) if state is not None else None
        if channel is None:
            return 0
        sent = self._deliver(channel, state, frame, except_socket_id)
        state.messages_out += sent * events  # the dashboard's charts
        metrics = self.metrics.app(app_id)  # once per event, never per delivery
        metrics.sent += sent * events
        metrics.sent_bytes += sent * len(frame)
        return sent

    def _deliver(self, channel, state, frame, except_socket_id):
        skip = state.connections.get(except_socket_id) if except_socket_id else None
        subscribers = channel.subscribers
        if not channel.sending and len(subscribers) <= YIELD_EVERY:
            for conn, send in subscribers.items():
                if conn is not skip:
                    send(frame)
            return len(subscribers) - (skip in subscribers)
        # A big channel yields while it fans out; later frames queue behind so that every
        # subscriber still sees the channel's events in order.
        queue = channel.queue
        if queue is None:
            queue = channel.queue = deque()
        queue.append((frame, skip))
        if channel.sending:
            return len(subscribers)
        channel.sending = True
        if in_the_loop():
            # Called in the event loop (a publish served there: reception.py), which must
            # not yield: the fan-out goes on in a greenlet.
            gevent.spawn_raw(self._drain, channel)
        else:
            self._drain(channel)
        return len(subscribers)

    @staticmethod
    def _drain(channel):
        """Send the channel's queued frames to its subscribers, yielding as it goes."""
        subscribers, queue = channel.subscribers, channel.queue
        try:
            while queue:
                # Frames queued during the last pass go out together: one send per socket
                # instead of one per frame (the syscall is most of a delivery's cost).
                if len(queue) == 1:
                    frame, skip = queue.popleft()
                    skips = None
                else:
                    batch = list(queue)
                    queue.clear()
                    frame = b"".join([f for f, _ in batch])
                    skips = {s for _, s in batch if s is not None}
                    skip = None
                for count, (conn, send) in enumerate(tuple(subscribers.items()), 1):
                    if skips and conn in skips:
                        own = b"".join([f for f, s in batch if s is not conn])
                        if own:
                            send(own)
                    elif conn is not skip:
                        send(frame)
                    if count % YIELD_EVERY == 0:
                        gevent.sleep(0)
        finally:
            channel.sending = False

    # ---------------------------------------------------------------- users

    def sign_in(self, conn, user_id):
        """Record a signed-in connection; return True when the user came online here."""
        users = self.app(conn.app.id).users
        sockets = users.get(user_id)
        if sockets is None:
            sockets = users[user_id] = {}
        sockets[conn] = None
        return len(sockets) == 1

    def sign_out(self, conn):
        """Forget a connection's sign-in and watchlist; return the user_id that went offline
        here, if any."""
        state = self.app(conn.app.id)
        for watched in conn.watchlist:
            watchers = state.watchers.get(watched)
            if watchers is not None:
                watchers.pop(conn, None)
                if not watchers:
                    del state.watchers[watched]
        if conn.user_id is None:
            return None
        sockets = state.users.get(conn.user_id)
        if sockets is None or conn not in sockets:
            return None
        del sockets[conn]
        if sockets:
            return None
        del state.users[conn.user_id]
        return conn.user_id

    def user_connections(self, app_id, user_id):
        state = self._apps.get(app_id)
        return list(state.users.get(user_id, ())) if state else []

    def user_online(self, app_id, user_id):
        state = self._apps.get(app_id)
        return bool(state and state.users.get(user_id))

    def watch(self, conn, user_ids):
        watchers = self.app(conn.app.id).watchers
        for user_id in user_ids:
            watchers.setdefault(user_id, {})[conn] = None

    def watchers(self, app_id, user_id):
        state = self._apps.get(app_id)
        return list(state.watchers.get(user_id, ())) if state else []

    # ---------------------------------------------------------------- cache channels

    def cache_set(self, app_id, name, event, data, ttl):
        state = self.app(app_id)
        now = time.monotonic()
        state.cache[name] = (event, data, now + ttl)
        channel = state.channels.get(name)
        if channel is not None:
            channel.missed = False
        state.cache_writes += 1
        if state.cache_writes > len(state.cache):
            # Amortized sweep: channels nobody reads again must not keep their events forever.
            state.cache_writes = 0
            for stale in [n for n, entry in state.cache.items() if entry[2] <= now]:
                del state.cache[stale]

    def first_cache_miss(self, app_id, name):
        """Whether a subscriber's miss on an empty cache channel is the first since the
        channel was occupied here or last filled: one cache_miss webhook per occupation until
        an event fills it. A channel with no subscriber here (its last one left while the
        miss was served) is reported and nothing is remembered."""
        channel = self.channel(app_id, name)
        if channel is None:
            return True
        if channel.missed:
            return False
        channel.missed = True
        return True

    def cache_get(self, app_id, name):
        """(event, data, seconds left) of a cache channel's last event, or None."""
        state = self._apps.get(app_id)
        entry = state.cache.get(name) if state else None
        if entry is None:
            return None
        left = entry[2] - time.monotonic()
        if left <= 0:
            del state.cache[name]
            return None
        return entry[0], entry[1], left
