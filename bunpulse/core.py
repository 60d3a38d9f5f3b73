"""The server core of one worker (`BunPulse`): what every connection, the HTTP API and the
library call. Its callbacks and socket ids are in hooks.py."""
import logging
import re
import time

import gevent

from . import protocol
from .adapters import make_adapter
from .adapters.local import LocalAdapter
from .addresses import TrustedProxies, client_address, counted_as
from .apps_reload import FollowReloads, live_apps
from .connection import Connection
from .devapp import DevAppGuard
from .errors import (ClientError, ConnectionRefused, ErrorCode, PresenceFull,
                     SubscriptionError)
from .hooks import Hooks, SocketIds
from .hub import YIELD_EVERY, Hub
from .logs import Throttled, printable
from .metrics import Metrics
from .subscription_counts import SubscriptionCounts
from .protocol import channel_kind, data_string
from .rates import ApiRates
from .frames import build_frame
from .webhooks import WebhookSender

log = logging.getLogger("bunpulse")

APP_PATH = re.compile(r"^/app/([^/]+)/?$")


class BunPulse:
    """One worker's Pusher server: what every connection, the HTTP API and the library call."""

    def __init__(self, settings, apps=None):
        self.settings = settings
        self.apps = apps if apps is not None else live_apps(settings)
        self.metrics = Metrics(enabled=settings.metrics_port is not None)
        self.limits = Throttled(log)  # "limit hit" lines, at most one a minute per app and kind
        self.stopping = False
        self.hub = Hub(self.metrics)
        self.adapter = make_adapter(settings, self.hub)
        self.rates = ApiRates(self.adapter)  # the apps' HTTP API rates (429 past them)
        self.webhooks = WebhookSender(settings, self.metrics, self._durable_webhooks(settings))
        self.counts = SubscriptionCounts(self)  # pusher_internal:subscription_count
        # The apps file re-read in place: what a reload does to the open connections.
        self.reloads = FollowReloads(self) if hasattr(self.apps, "on_reload") else None
        self.hooks = Hooks()
        self.new_socket_id = SocketIds()
        # Clients ping after this many seconds of silence, well before the server's timeout.
        # Whole seconds, except under one second (test settings): a floor of 1 s would let the
        # client stay silent past a sub-second heartbeat timeout. pusher-js multiplies by 1000.
        seconds = min(120, settings.heartbeat_interval / 1000)
        self.activity_timeout = int(seconds) if seconds >= 1 else seconds
        self.trusted_proxies = TrustedProxies(settings.trust_proxy)
        self.dev_app = DevAppGuard(settings)  # served on loopback only
        self._per_address = {}  # client address -> its open connections (with the option only)
        self._local = type(self.adapter) is LocalAdapter  # nothing it does can wait
        # The debug dashboard (bunpulse.dashboard), when enabled: `watching` holds the ids of
        # the apps someone watches, so that an event costs one dict lookup when nobody does.
        self.watching = {}
        self.dashboard = None
        self.adapter.bind(self)
        self.adapter.start()
        self.webhooks.start(lambda: self.apps)  # with Redis: pending ones, a dead worker's too

    def _durable_webhooks(self, settings):
        """With Redis, webhooks are queued there (webhook_queue.py); else in memory."""
        if not settings.redis_url:
            return None
        from .webhook_queue import DurableWebhooks  # imports redis: only when it is used
        return DurableWebhooks(self.adapter, settings)

    # ---------------------------------------------------------------- connections

    def admit(self, path, query, origin=None):
        """The app a new connection is for, or the ConnectionRefused to report on the socket
        once it is upgraded. `origin`: the upgrade's Origin header (None without one)."""
        try:
            return self._admit(path, query, origin)
        except ConnectionRefused as refusal:
            return refusal

    def serve_websocket(self, ws, admission, address=None):
        """Run one Pusher connection on an upgraded socket, given what `admit` said; returns
        at once: the event loop serves the socket from then on. `address` (the client's, see
        `address_of`) is counted against max_connections_per_ip while the connection lasts."""
        if self.reloads is not None and not self.reloads.watching:
            self.reloads.watch()  # from the hub that serves the connections
        ws.max_message_size = self.settings.max_message_size
        ws.outbox.limit = self.settings.max_buffer
        if isinstance(admission, ConnectionRefused):
            self._refuse_socket(ws, admission)
            return
        if address is not None:
            held = self._per_address.get(address, 0)
            if held >= self.settings.max_connections_per_ip:
                self.limits.warning(("", "max_connections_per_ip"), "%s has %d connections "
                                    "open: more are refused with 4004 "
                                    "(--max-connections-per-ip)", address, held,
                                    limit="max_connections_per_ip")
                self._refuse_socket(ws, ConnectionRefused(
                    ErrorCode.OVER_CONNECTION_QUOTA,
                    f"Too many connections from your address (at most "
                    f"{self.settings.max_connections_per_ip})"))
                return
            self._per_address[address] = held + 1
        conn = Connection(self, admission, ws, self.new_socket_id())
        conn.address = address
        conn.start()

    def address_of(self, environ):
        """The client address a new socket counts against, or None when nothing is counted."""
        if not self.settings.max_connections_per_ip:
            return None
        return counted_as(client_address(environ, self.trusted_proxies),
                          self.settings.ipv6_prefix)

    @staticmethod
    def _refuse_socket(ws, refusal):
        ws.send_bytes(protocol.error(refusal.code, refusal.message))
        ws.close(refusal.code, refusal.message)
        ws.start(None)  # waits for the client's close frame

    def requests_at_once(self):
        """Whether a WebSocket upgrade or a publish call can be served in the event loop,
        where nothing may wait: the local adapter, no hook on connections, nobody watching
        the dashboard."""
        return self._local and not self.watching and not self.hooks.wanted("connection")

    def serves_at_once(self, app, event, data):
        """Whether a subscribe or unsubscribe can be served in the event loop, where nothing
        may wait: the local adapter, no hook for it, no webhook for the app, and a channel
        small enough that its fan-out (presence member events) does not yield."""
        if not self._local or app.webhooks or self.hooks.wanted(event) or app.id in self.watching:
            return False
        name = data.get("channel") if isinstance(data, dict) else None
        if not isinstance(name, str) or not name.startswith("presence-"):
            return True  # a malformed one is answered with an error, in the loop too
        channel = self.hub.channel(app.id, name)
        return channel is None or (not channel.sending
                                   and len(channel.subscribers) < YIELD_EVERY)

    def _admit(self, path, query, origin):
        match = APP_PATH.match(path)
        if match is None:
            raise ConnectionRefused(ErrorCode.PATH_NOT_FOUND,
                                    "Path not found: connect to /app/{key}")
        key = match.group(1)
        app = self.apps.by_key(key)
        if app is None:
            raise ConnectionRefused(ErrorCode.APP_NOT_FOUND, f"App key {key} does not exist.")
        version = query.get("protocol")
        if not version:
            raise ConnectionRefused(ErrorCode.NO_PROTOCOL, "No protocol version supplied")
        if not version.isdigit() or int(version) not in protocol.PROTOCOL_VERSIONS:
            raise ConnectionRefused(ErrorCode.UNSUPPORTED_PROTOCOL,
                                    f"Unsupported protocol version {version[:16]}: use 5, 6 or 7")
        if not app.enabled:
            raise ConnectionRefused(ErrorCode.APP_DISABLED, "Application is disabled")
        if not app.allowed_origins.allows(origin):
            # 4009, as Reverb answers it: pusher-js stops there (a 4000-4099 close), where an
            # HTTP 403 on the upgrade would have it retry for ever.
            self.limits.warning((app.id, "allowed_origins"), "app %s: a page from %s was "
                                "refused (allowed_origins): 4009", app.id, printable(origin[:200]),
                                app_id=app.id, limit="allowed_origins")
            raise ConnectionRefused(ErrorCode.UNAUTHORIZED,
                                    f"Origin not allowed: {origin[:200]}")
        if app.max_connections and self.adapter.connection_count(app.id) >= app.max_connections:
            self.limits.warning((app.id, "max_connections"), "app %s is at its connection limit "
                                "(%d): new connections are refused with 4004", app.id,
                                app.max_connections, app_id=app.id, limit="max_connections")
            raise ConnectionRefused(ErrorCode.OVER_CONNECTION_QUOTA,
                                    "Application is over its connection quota")
        return app

    def connected(self, conn):
        """A connection is established: count it and make it reachable."""
        self.adapter.add_connection(conn)
        if conn.app.id in self.watching:
            self.dashboard.log(conn.app.id, "connection", socket_id=conn.socket_id)

    def disconnected(self, conn):
        address = conn.address
        if address is not None:  # counted against max_connections_per_ip
            left = self._per_address[address] - 1
            if left:
                self._per_address[address] = left
            else:
                del self._per_address[address]
        if conn.app.id in self.watching:
            self.dashboard.closed(conn)
        changes, offline = self.adapter.remove_connection(conn)
        for change in changes:
            self._left(conn.app, change)
        if offline is not None:
            self._tell_watchers(conn.app, offline, "offline")
        self.hooks.emit("disconnect", conn, None)

    def redis_state(self):
        """'up', 'down' or 'not configured': what /ready reports."""
        if not self.settings.redis_url:
            return "not configured"
        return "up" if self.adapter.ready() else "down"

    def drain(self):
        """A stop is coming: /health and /ready answer 503, the clients stay for now."""
        self.stopping = True

    def shutdown(self):
        """Tell every client to reconnect at once (4200), e.g. when a worker stops."""
        self.stopping = True  # /health and /ready answer 503 from now on
        deadline = time.monotonic() + self.settings.shutdown_grace_ms / 1000
        for conn in self.hub.connections():
            conn.refuse(ErrorCode.RECONNECT, "Server is restarting: reconnect")
        # Within --shutdown-grace-ms, let them leave and send the webhooks their leaving
        # causes: channels this server vacated are reported, not left occupied at the receiver.
        while self.hub.connections() and time.monotonic() < deadline:
            gevent.sleep(0.02)
        if self.reloads is not None:
            self.reloads.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        self.webhooks.close(grace=max(0.0, deadline - time.monotonic()))
        self.adapter.stop()
        self.metrics.stop_flushing()  # the last counts land before the worker exits

    # ---------------------------------------------------------------- channels

    def subscribe(self, conn, name, data):
        conn.refresh_app()  # a changed apps file: its keys verify the auth, its limits apply
        app = conn.app
        if not protocol.valid_channel_name(name, app.max_channel_name_length):
            raise SubscriptionError(
                f"Invalid channel name: 1 to {app.max_channel_name_length} characters of "
                "A-Z a-z 0-9 _ - = @ , . ;", 400, "InvalidChannelName")
        if name in conn.subscriptions:
            # As Pusher answers it: nothing changes, and a presence member keeps the identity
            # it joined with (another user_id must not hide behind it).
            raise ClientError(f"Existing subscription to channel {name}")
        limit = self.settings.max_subscriptions
        if len(conn.subscriptions) >= limit:
            self.limits.warning((app.id, "max_subscriptions"), "app %s: connection %s holds "
                                "%d channels: more subscriptions are refused", app.id,
                                conn.socket_id, limit, app_id=app.id, limit="max_subscriptions")
            raise SubscriptionError(f"Subscription limit reached: at most {limit} channels "
                                    "per connection", 403, "LimitReached")
        member = conn.authorize(name, data)
        kind = channel_kind(name)
        try:
            occupied, added, roster = self.adapter.subscribe(
                conn, name, member, app.max_presence_members)
        except PresenceFull:
            self.limits.warning((app.id, "max_presence_members"), "app %s: presence "
                                "channel %s is full (%d members): subscriptions refused",
                                app.id, name, app.max_presence_members, app_id=app.id,
                                limit="max_presence_members")
            raise SubscriptionError(f"Presence channel {name} is full "
                                    f"({app.max_presence_members} members)", 403,
                                    "LimitReached") from None
        conn.send(protocol.subscription_succeeded(
            name, None if roster is None else protocol.presence_roster(roster)))
        if app.id in self.watching:
            self.dashboard.subscribed(conn, name, occupied, member if added else None)
        if added:
            self.adapter.publish(app.id, name, build_frame(
                protocol.member_added(name, member[0], member[1])), conn.socket_id)
        emit = self.webhooks.emit
        if occupied:
            emit(app, {"name": "channel_occupied", "channel": name})
        if added:
            emit(app, {"name": "member_added", "channel": name, "user_id": member[0]})
        if app.webhooks:  # every new subscription changes the count, as every leave
            self._emit_subscription_count(app, name)
        self.counts.changed(app, name)
        if kind.cache:
            self._replay_cache(conn, name)

    def unsubscribe(self, conn, name):
        change = self.adapter.unsubscribe(conn, name)
        if change is not None and conn.app.id in self.watching:
            self.dashboard.log(conn.app.id, "unsubscribed", socket_id=conn.socket_id,
                               channel=name)
        if change is not None:
            self._left(conn.app, change)

    def _left(self, app, change):
        name, vacated, removed = change
        if app.id in self.watching:
            self.dashboard.left(app.id, name, vacated, removed)
        if removed is not None:
            self.adapter.publish(app.id, name, build_frame(protocol.member_removed(name, removed)))
            self.webhooks.emit(app, {"name": "member_removed", "channel": name,
                                     "user_id": removed})
        if vacated:
            self.webhooks.emit(app, {"name": "channel_vacated", "channel": name})
            return
        if app.webhooks:
            self._emit_subscription_count(app, name)
        self.counts.changed(app, name)

    def cluster_removals(self, left, offline):
        """Announce what a dead node's departure removed: [(app_id, Left)] and
        [(app_id, user_id gone offline)]."""
        for app_id, change in left:
            app = self.apps.by_id(app_id)
            if app is not None:
                self._left(app, change)
        for app_id, user_id in offline:
            app = self.apps.by_id(app_id)
            if app is not None:
                self._tell_watchers(app, user_id, "offline")

    def cluster_recounted(self, channels):
        """A dead node's subscriptions were taken from these [(app_id, channel)], still
        occupied elsewhere: their subscribers get the new count."""
        for app_id, channel in channels:
            app = self.apps.by_id(app_id)
            if app is not None:
                self.counts.changed(app, channel)

    def _emit_subscription_count(self, app, name):
        if self.webhooks.wanted(app, "subscription_count"):
            self.webhooks.emit(app, {"name": "subscription_count", "channel": name,
                                     "subscription_count":
                                         self.adapter.subscription_count(app.id, name)})

    def _replay_cache(self, conn, name):
        cached = self.adapter.cache_get(conn.app.id, name)
        if cached is not None:
            conn.send(protocol.event(cached[0], name, cached[1]))
            return
        conn.send(protocol.cache_miss(name))
        if self.adapter.first_cache_miss(conn.app.id, name):  # one webhook until refilled
            self.webhooks.emit(conn.app, {"name": "cache_miss", "channel": name})

    # ---------------------------------------------------------------- events

    def trigger(self, app, channels, name, data, socket_id=None):
        """Publish one event (data: a string, forwarded as is) to channels; the frame is built
        once per channel and shared by every subscriber."""
        data = data_string(data)
        self.metrics.app(app.id).published += len(channels)
        if app.id in self.watching:
            self.dashboard.published(app.id, channels, name, data, socket_id)
        for channel in channels:
            if channel_kind(channel).cache:
                self.adapter.cache_set(app.id, channel, name, data, self.settings.cache_ttl)
            self.adapter.publish(app.id, channel,
                                 build_frame(protocol.event(name, channel, data)), socket_id)

    def client_event(self, conn, channel, name, data, user_id):
        app = conn.app
        self.metrics.app(app.id).client_events += 1
        self.adapter.publish(app.id, channel,
                             build_frame(protocol.event(name, channel, data, user_id)),
                             conn.socket_id)
        if app.id in self.watching:
            self.dashboard.log(app.id, "client_event", socket_id=conn.socket_id,
                               channel=channel, event=name, data=data_string(data),
                               user_id=user_id)
        if app.webhooks:
            hook = {"name": "client_event", "channel": channel, "event": name,
                    "data": data_string(data), "socket_id": conn.socket_id}
            if user_id is not None:
                hook["user_id"] = user_id
            self.webhooks.emit(app, hook)
        self.hooks.emit("client_event", conn, {"event": name, "channel": channel, "data": data})

    def connection_count(self, app):
        return self.adapter.connection_count(app.id)

    def channel_counts(self, app):
        """{channel: (subscription_count, user_count)} for every occupied channel."""
        return self.adapter.channel_counts(app.id)

    def subscription_count(self, app, channel):
        return self.adapter.subscription_count(app.id, channel)

    def members(self, app, channel):
        """{user_id: user_info} of a presence channel."""
        return self.adapter.members(app.id, channel)

    def cached(self, app, channel):
        """(event, data, seconds left) of a cache channel's last event, or None."""
        return self.adapter.cache_get(app.id, channel)

    def channel_info(self, app, channel, attributes):
        info = {}
        if "subscription_count" in attributes:
            info["subscription_count"] = self.adapter.subscription_count(app.id, channel)
        if "user_count" in attributes and channel_kind(channel).presence:
            info["user_count"] = self.adapter.member_count(app.id, channel)
        return info

    # ---------------------------------------------------------------- users

    def sign_in(self, conn, user, user_data):
        app = conn.app  # a connection signs in once (Connection._signin refuses a second)
        conn.user_id, conn.user_data = user["id"], user_data
        came_online = self.adapter.sign_in(conn, conn.user_id)
        conn.send(protocol.signin_success(user_data))
        watchlist = user.get("watchlist") or []
        if len(watchlist) > protocol.MAX_WATCHLIST:
            conn.send_error(ErrorCode.WATCHLIST_LIMIT,
                            f"Watchlist limit exceeded: only the first {protocol.MAX_WATCHLIST} "
                            "user ids are watched")
            watchlist = watchlist[:protocol.MAX_WATCHLIST]
        conn.watchlist = tuple(dict.fromkeys(watchlist))
        if conn.watchlist:
            self.adapter.watch(conn, conn.watchlist)
            online = [u for u in conn.watchlist if self.adapter.user_online(app.id, u)]
            offline = [u for u in conn.watchlist if u not in online]
            conn.send(protocol.watchlist_events(
                [(n, ids) for n, ids in (("online", online), ("offline", offline)) if ids]))
        if came_online:
            self._tell_watchers(app, conn.user_id, "online")

    def _tell_watchers(self, app, user_id, status):
        self.adapter.tell_watchers(app.id, user_id,
                                   build_frame(protocol.watchlist_events([(status, [user_id])])))

    def terminate_user(self, app, user_id):
        self.adapter.terminate_user(app.id, user_id)
