"""One Pusher connection: its messages, their dispatch, and the heartbeat.

The transport calls `take` for each message from the event loop, where nothing may block:
pings are answered there, everything else is handed back to run in a short-lived greenlet."""
import logging
import math
import time

import gevent

from . import protocol
from .errors import ClientError, ErrorCode, SubscriptionError, WsClose
from .protocol import channel_kind
from .signatures import channel_auth_ok, user_auth_ok
from .frames import build_frame
from .metrics import AppMetrics

log = logging.getLogger("bunpulse.connection")
_NEVER = -math.inf  # one float shared by every connection until its first message

# Events whose answer cannot wait on anything: handled in the event loop, unless a hook wants
# them (a user's callback may block).
_ANSWERED_AT_ONCE = frozenset(("pusher:ping", "pusher:pong"))
# Served there too when the core says nothing in them can wait (BunPulse.serves_at_once).
_SUBSCRIPTIONS = frozenset(("pusher:subscribe", "pusher:unsubscribe"))


class Connection:
    __slots__ = ("core", "app", "ws", "outbox", "socket_id", "subscriptions", "user_id",
                 "user_data", "watchlist", "last_seen", "closed", "_pinged", "_timer",
                 "_auth_timer", "_window", "_window_count", "_allowance", "_allowance_at",
                 "metrics", "address", "__weakref__")

    def __init__(self, core, app, ws, socket_id):
        self.core = core
        self.app = app
        self.ws = ws
        self.outbox = ws.outbox
        self.socket_id = socket_id
        self.address = None  # counted against max_connections_per_ip (set by the core)
        self.subscriptions = {}  # channel -> presence user_id or None
        self.user_id = None
        self.user_data = None
        self.watchlist = ()
        self.last_seen = time.monotonic()
        self.closed = False
        self._pinged = False
        self._timer = None
        self._auth_timer = None
        self._window = 0
        self._window_count = 0
        # Tokens of the message rate limit; the first message fills the bucket to the burst.
        self._allowance = 0.0
        self._allowance_at = _NEVER
        # The app's metrics, bound once (a connection built without a core counts for nobody)
        self.metrics = core.metrics.app(app.id) if core is not None else AppMetrics(None, app.id)

    # ---------------------------------------------------------------- life cycle

    def start(self):
        """Serve the socket; returns at once (the event loop reads it from then on)."""
        core = self.core
        self.metrics.connections.inc()
        self.metrics.connections_opened_total.inc()
        self.send(protocol.connection_established(self.socket_id, core.activity_timeout))
        core.connected(self)
        self._arm_heartbeat(core.settings.heartbeat_interval / 1000)
        if self.app.user_authentication_timeout:
            self._auth_timer = gevent.get_hub().loop.timer(
                self.app.user_authentication_timeout / 1000)
            self._auth_timer.start(self._require_authorization)
        core.hooks.emit("connection", self, None)
        self.ws.start(self)

    def take(self, message):
        """One message, in the event loop: None once handled, else the parsed frame for
        `run`, in a greenlet (a subscription may wait on Redis, a hook, a big fan-out)."""
        metrics = self.metrics
        metrics.received += 1
        metrics.received_bytes += (len(message) if isinstance(message, bytes)
                                   or message.isascii() else len(message.encode()))
        self.core.hub.app(self.app.id).messages_in += 1  # the dashboard's charts
        self.last_seen = now = time.monotonic()
        self._pinged = False
        if self._flooding(now):
            return None
        try:
            if isinstance(message, bytes):
                self.send_error(None, "Binary frames are not supported: send JSON text")
                return None
            frame = protocol.parse_client_frame(message)
            event = frame.event
            if event in _ANSWERED_AT_ONCE:
                at_once = not self.core.hooks.wanted(event)
            else:
                at_once = event in _SUBSCRIPTIONS and self.core.serves_at_once(
                    self.app, event, frame.data)
            if at_once:
                self.dispatch(frame)
                return None
        except ClientError as exc:
            self.send_error(exc.code, exc.message)
            return None
        except Exception:  # noqa: BLE001 - one bad frame must not end the worker
            log.exception("error handling a frame from %s", self.socket_id)
            self.send_error(None, "Internal server error")
            return None
        return frame

    def run(self, frame):
        try:
            self.dispatch(frame)
        except ClientError as exc:
            self.send_error(exc.code, exc.message)
        except Exception:  # noqa: BLE001 - one bad frame must not end the worker
            log.exception("error handling a frame from %s", self.socket_id)
            self.send_error(None, "Internal server error")

    def ended(self):
        """The socket is over (called in the event loop): the leaving may wait on Redis,
        webhooks and hooks, so it runs in a greenlet."""
        self.closed = True
        gevent.spawn_raw(self._cleanup)

    def _cleanup(self):
        self.closed = True
        for timer in (self._timer, self._auth_timer):
            if timer is not None:
                timer.stop()
                timer.close()
        core, metrics = self.core, self.metrics
        metrics.connections.dec()
        code = self.outbox.close_code or self.ws.close_code or WsClose.ABNORMAL
        metrics.closed(code).inc()
        if code == ErrorCode.OVER_CAPACITY:
            metrics.evictions_total.inc()
        elif code == WsClose.MESSAGE_TOO_BIG:
            core.limits.warning((self.app.id, "max_message_size"), "app %s: a client sent a "
                                "message over %d bytes: closed with 1009", self.app.id,
                                core.settings.max_message_size, app_id=self.app.id,
                                limit="max_message_size")
        core.disconnected(self)

    def send(self, payload):
        """Send one JSON message (bytes) to this client."""
        frame = build_frame(payload)
        self.outbox.send(frame)
        self.metrics.sent += 1
        self.metrics.sent_bytes += len(frame)

    def send_error(self, code, message):
        self.send(protocol.error(code, message))

    def close(self, code, reason=""):
        if not self.ws.closed:
            self.ws.close(code, reason)

    def refuse(self, code, message):
        """pusher:error then close with the same code."""
        self.send_error(int(code), message)
        self.close(code, message)

    def terminate(self):
        self.refuse(ErrorCode.UNAUTHORIZED, "You got disconnected by the app.")

    # ---------------------------------------------------------------- message rate

    def _flooding(self, now):
        """Take one message from the allowance (a token bucket: `message_burst` at once,
        refilled at `max_messages_per_second`); a client past it is refused with 4100, which
        pusher-js answers by reconnecting after a back-off, not at once."""
        settings = self.core.settings
        rate = settings.max_messages_per_second
        if not rate:
            return False
        allowance = min(settings.message_burst,
                        self._allowance + (now - self._allowance_at) * rate)
        self._allowance_at = now
        if allowance >= 1:
            self._allowance = allowance - 1
            return False
        self._allowance = allowance
        if not self.ws.closed:
            self.core.limits.warning(
                (self.app.id, "max_messages_per_second"), "app %s: closing %s with 4100: more "
                "than %d messages per second", self.app.id, self.socket_id, rate,
                app_id=self.app.id, limit="max_messages_per_second")
            self.refuse(ErrorCode.OVER_CAPACITY,
                        f"Too many messages: at most {rate} per second "
                        f"(bursts of {settings.message_burst})")
        return True

    def ping_frame(self):
        """A WebSocket ping frame (in the event loop): answered by the transport, counted here
        like a message."""
        self._flooding(time.monotonic())

    # ---------------------------------------------------------------- heartbeat

    def _arm_heartbeat(self, delay):
        self._timer = gevent.get_hub().loop.timer(max(delay, 0.01))
        self._timer.start(self._beat)

    def _beat(self):
        if self.closed or self.ws.closed:
            return
        settings = self.core.settings
        idle = time.monotonic() - self.last_seen
        interval, timeout = settings.heartbeat_interval / 1000, settings.heartbeat_timeout / 1000
        if idle >= timeout:
            self.close(ErrorCode.PONG_NOT_RECEIVED, "Pong reply not received")
            return
        if idle >= interval and not self._pinged:
            self._pinged = True
            self.send(protocol.PING)
        self._arm_heartbeat((timeout if self._pinged else interval) - idle)

    def _require_authorization(self):
        if self.closed or self.user_id is not None:
            return
        if any(channel_kind(name).private for name in self.subscriptions):
            return
        self.refuse(ErrorCode.UNAUTHORIZED,
                    "Connection not authorized within timeout: sign in or subscribe to a "
                    "private channel")

    # ---------------------------------------------------------------- dispatch

    def dispatch(self, frame):
        event = frame.event
        if event == "pusher:ping":
            self.send(protocol.PONG)
        elif event == "pusher:pong":
            pass
        elif event == "pusher:subscribe":
            self._subscribe(frame.data)
        elif event == "pusher:unsubscribe":
            self._unsubscribe(frame.data)
        elif event == "pusher:signin":
            self._signin(frame.data)
        elif event.startswith("client-"):
            self._client_event(frame)
            return
        else:
            raise ClientError(f"Unsupported event: {event[:64]}")
        self.core.hooks.emit(event, self, frame.data)

    def _subscribe(self, data):
        if not isinstance(data, dict) or not isinstance(data.get("channel"), str):
            raise ClientError("pusher:subscribe needs data.channel, a string")
        name = data["channel"]
        try:
            self.core.subscribe(self, name, data)
        except SubscriptionError as exc:
            self.send(protocol.subscription_error(name, exc.message, exc.status, exc.error_type))
            self.send_error(exc.code, exc.message)
            return
        if self._auth_timer is not None and channel_kind(name).private:
            self._auth_timer.stop()  # authorized for good, even if it unsubscribes later

    def _unsubscribe(self, data):
        if not isinstance(data, dict) or not isinstance(data.get("channel"), str):
            raise ClientError("pusher:unsubscribe needs data.channel, a string")
        self.core.unsubscribe(self, data["channel"])

    def authorize(self, name, data):
        """Check a subscription's auth; return the presence member (user_id, user_info) or
        None. Raise SubscriptionError when refused."""
        kind = channel_kind(name)
        if kind.user:
            if self.user_id is None or name != protocol.user_channel(self.user_id):
                raise SubscriptionError(f"Only the user signed in on this connection may "
                                        f"subscribe to {name}", 403, "AuthError",
                                        ErrorCode.UNAUTHORIZED)
            return None
        if not kind.private:
            return None
        auth = data.get("auth")
        channel_data = data.get("channel_data")
        if kind.presence and channel_data is None and self.user_id is not None:
            if not channel_auth_ok(self.app, self.socket_id, name, auth):
                raise SubscriptionError(f"Invalid signature: expected HMAC SHA256 hex digest of "
                                        f"{self.socket_id}:{name}")
            info = protocol.loads(self.user_data).get("user_info")
            try:
                protocol.check_user_info(info, self.app.max_presence_member_size_in_kb * 1024)
            except ValueError as exc:
                raise SubscriptionError(f"Invalid user_data: {exc}", 400,
                                        "InvalidChannelData") from None
            return self.user_id, info
        if kind.presence:
            if not isinstance(channel_data, str):
                raise SubscriptionError("Presence channels need channel_data, a JSON string",
                                        400, "InvalidChannelData")
            if not channel_auth_ok(self.app, self.socket_id, name, auth, channel_data):
                raise SubscriptionError(f"Invalid signature: expected HMAC SHA256 hex digest of "
                                        f"{self.socket_id}:{name}:channel_data")
            try:
                return protocol.parse_presence_data(
                    channel_data, self.app.max_presence_member_size_in_kb * 1024)
            except ValueError as exc:
                raise SubscriptionError(f"Invalid channel_data: {exc}", 400,
                                        "InvalidChannelData") from None
        if not channel_auth_ok(self.app, self.socket_id, name, auth):
            raise SubscriptionError(f"Invalid signature: expected HMAC SHA256 hex digest of "
                                    f"{self.socket_id}:{name}")
        return None

    def refresh_app(self):
        """Before a subscription or a sign-in: the app's record as the apps store has it now
        (a rotation's pair added since this connection opened, webhooks); kept when the app
        is gone."""
        if self.core is not None:
            self.app = self.core.apps.by_id(self.app.id) or self.app

    def _client_event(self, frame):
        app, name, channel = self.app, frame.event, frame.channel
        if not app.client_events:
            raise ClientError("Client events are not enabled for this app")
        if not isinstance(channel, str) or channel not in self.subscriptions:
            raise ClientError(f"Client event rejected: not subscribed to {channel}")
        kind = channel_kind(channel)
        if not kind.client_events_allowed:
            raise ClientError("Client events are only allowed on private and presence "
                              "channels (never encrypted ones)")
        if len(name) > app.max_event_name_length:
            raise ClientError(f"Event name is longer than {app.max_event_name_length} "
                              "characters")
        now = int(time.monotonic())
        if now != self._window:
            self._window, self._window_count = now, 0
        self._window_count += 1
        if self._window_count > app.max_client_events_per_second:
            self.core.limits.warning((app.id, "max_client_events_per_second"),
                                     "app %s: a client passed %d client events a second: "
                                     "rejected with 4301", app.id,
                                     app.max_client_events_per_second, app_id=app.id,
                                     limit="max_client_events_per_second")
            raise ClientError("Client event rejected due to rate limit",
                              ErrorCode.CLIENT_EVENT_REJECTED)
        data = frame.data
        if len(protocol.dumps(data)) > app.max_event_data_size:
            raise ClientError(f"Client event data is larger than {app.max_event_data_size} "
                              "bytes")
        self.core.client_event(self, channel, name, data,
                                 self.subscriptions[channel] if kind.presence else None)

    def _signin(self, data):
        if not isinstance(data, dict):
            raise ClientError("pusher:signin needs data with auth and user_data")
        if self.user_id is not None:
            # One user per connection: a second one would inherit the first one's
            # #server-to-user channel, and the user counts would go wrong.
            raise ClientError(f"Already signed in as {self.user_id[:64]}: open a new "
                              "connection to sign in as another user")
        user_data, auth = data.get("user_data"), data.get("auth")
        self.refresh_app()
        if not isinstance(user_data, str) or not user_auth_ok(self.app, self.socket_id,
                                                              user_data, auth):
            self.refuse(ErrorCode.UNAUTHORIZED, "Invalid signature for pusher:signin")
            return
        try:
            user = protocol.parse_user_data(user_data)
        except ValueError as exc:
            self.refuse(ErrorCode.UNAUTHORIZED, f"Invalid user_data: {exc}")
            return
        self.core.sign_in(self, user, user_data)
