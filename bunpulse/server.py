"""The Pusher server: its core (`BunPulse`), the Flask app factory, the embedded gevent
server and the library API (`start_bunpulse`)."""
import logging
import os
import re
import secrets
import threading
from itertools import count

import gevent
import gevent.event
from flask import Flask, jsonify, request
from gevent.pywsgi import WSGIServer
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import WebsocketMismatch

from . import protocol
from .adapters import make_adapter
from .adapters.local import LocalAdapter, PresenceFull
from .apps import load_apps
from .config import ConfigError, listen_host, load_settings, redacted, uses_dev_app
from .connection import Connection
from .errors import ConnectionRefused, PusherError, SubscriptionError
from .hub import Hub
from .protocol import channel_kind, data_string
from .frames import build_frame
from .transport import PusherWebSocketHandler
from .webhooks import WebhookSender

log = logging.getLogger("bunpulse")

APP_PATH = re.compile(r"^/app/([^/]+)/?$")


class SocketIds:
    """`<process>.<counter>` ids: the random process part keeps them unique across workers and
    machines, and is drawn anew after a fork."""

    def __init__(self):
        self._pid = None

    def __call__(self):
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._prefix = str(secrets.randbelow(9 * 10 ** 9) + 10 ** 9)
            self._counter = count(1)
        return f"{self._prefix}.{next(self._counter)}"


class Hooks:
    """`server.on(event, callback)`: callbacks get (connection, data); errors are logged."""

    def __init__(self):
        self._callbacks = {}

    def on(self, event, callback):
        self._callbacks.setdefault(event, []).append(callback)
        return callback

    def wanted(self, event):
        return event in self._callbacks

    def emit(self, event, conn, data):
        for callback in self._callbacks.get(event, ()):
            try:
                callback(conn, data)
            except Exception:  # noqa: BLE001 - a user callback never takes the server down
                log.exception("callback for %r failed", event)


class BunPulse:
    """One worker's Pusher server: what every connection, the HTTP API and the library call."""

    def __init__(self, settings, apps=None):
        self.settings = settings
        self.apps = apps if apps is not None else load_apps(settings)
        self.hub = Hub()
        self.adapter = make_adapter(settings, self.hub)
        self.webhooks = WebhookSender(settings)
        self.hooks = Hooks()
        self.new_socket_id = SocketIds()
        # Clients ping after this many seconds of silence, well before the server's timeout.
        # Whole seconds, except under one second (test settings): a floor of 1 s would let the
        # client stay silent past a sub-second heartbeat timeout. pusher-js multiplies by 1000.
        seconds = min(120, settings.heartbeat_interval / 1000)
        self.activity_timeout = int(seconds) if seconds >= 1 else seconds
        self.evictions = 0
        self._local = type(self.adapter) is LocalAdapter
        self.adapter.bind(self)
        self.adapter.start()

    # ---------------------------------------------------------------- connections

    def admit(self, path, query):
        """The app a new connection is for, or the ConnectionRefused to report on the socket
        once it is upgraded."""
        try:
            return self._admit(path, query)
        except ConnectionRefused as refusal:
            return refusal

    def serve_websocket(self, ws, admission):
        """Run one Pusher connection on an upgraded socket, given what `admit` said; returns
        at once: the event loop serves the socket from then on."""
        ws.max_message_size = self.settings.max_message_size
        ws.outbox.limit = self.settings.max_buffer
        ws.outbox.on_evict = self._count_eviction
        if isinstance(admission, ConnectionRefused):
            ws.send_bytes(protocol.error(admission.code, admission.message))
            ws.close(admission.code, admission.message)
            ws.start(None)  # waits for the client's close frame
            return
        Connection(self, admission, ws, self.new_socket_id()).start()

    def subscribes_at_once(self, app, data):
        """Whether a subscription can be served in the event loop, where nothing may wait: no
        Redis, no hook, no webhook, and no presence channel (its member_added fans out)."""
        return (self._local and not app.webhooks and not self.hooks.wanted("pusher:subscribe")
                and isinstance(data, dict) and isinstance(data.get("channel"), str)
                and not data["channel"].startswith("presence-"))

    def _admit(self, path, query):
        match = APP_PATH.match(path)
        if match is None:
            raise ConnectionRefused(PusherError.PATH_NOT_FOUND,
                                    f"Path not found: connect to /app/{{key}}")
        key = match.group(1)
        app = self.apps.by_key(key)
        if app is None:
            raise ConnectionRefused(PusherError.APP_NOT_FOUND, f"App key {key} does not exist.")
        version = query.get("protocol")
        if not version:
            raise ConnectionRefused(PusherError.NO_PROTOCOL, "No protocol version supplied")
        if not version.isdigit() or int(version) not in protocol.PROTOCOL_VERSIONS:
            raise ConnectionRefused(PusherError.UNSUPPORTED_PROTOCOL,
                                    f"Unsupported protocol version {version[:16]}: use 5, 6 or 7")
        if not app.enabled:
            raise ConnectionRefused(PusherError.APP_DISABLED, "Application is disabled")
        if app.max_connections and self.adapter.connection_count(app.id) >= app.max_connections:
            raise ConnectionRefused(PusherError.OVER_CONNECTION_QUOTA,
                                    "Application is over its connection quota")
        return app

    def _count_eviction(self):
        self.evictions += 1

    def disconnected(self, conn):
        changes, offline = self.adapter.remove_connection(conn)
        for change in changes:
            self._left(conn.app, change)
        if offline is not None:
            self._tell_watchers(conn.app, offline, "offline")
        self.hooks.emit("disconnect", conn, None)

    def shutdown(self):
        """Tell every client to reconnect at once (4200), e.g. when a worker stops."""
        for conn in self.hub.connections():
            conn.refuse(PusherError.RECONNECT, "Server is restarting: reconnect")
        # Let them leave (up to 1 s) and send the webhooks their leaving causes (up to 2 s):
        # channels this server vacated are reported, not left occupied at the receiver.
        for _ in range(50):
            if not self.hub.connections():
                break
            gevent.sleep(0.02)
        self.webhooks.close(grace=2.0)
        self.adapter.stop()

    # ---------------------------------------------------------------- channels

    def subscribe(self, conn, name, data):
        app = conn.app
        if not protocol.valid_channel_name(name, app.max_channel_name_length):
            raise SubscriptionError(
                f"Invalid channel name: 1 to {app.max_channel_name_length} characters of "
                "A-Z a-z 0-9 _ - = @ , . ;", 400, "InvalidChannelName")
        member = conn.authorize(name, data)
        kind = channel_kind(name)
        new = name not in conn.subscriptions
        if new:
            try:
                occupied, added, roster = self.adapter.subscribe(
                    conn, name, member, app.max_presence_members)
            except PresenceFull:
                raise SubscriptionError(f"Presence channel {name} is full "
                                        f"({app.max_presence_members} members)", 403,
                                        "LimitReached") from None
        else:
            added = occupied = False
            roster = self.adapter.members(app.id, name) if kind.presence else None
        conn.send(protocol.subscription_succeeded(
            name, None if roster is None else protocol.presence_roster(roster)))
        if added:
            self.adapter.publish(app.id, name, build_frame(
                protocol.member_added(name, member[0], member[1])), conn.socket_id)
        emit = self.webhooks.emit
        if occupied:
            emit(app, {"name": "channel_occupied", "channel": name})
        if added:
            emit(app, {"name": "member_added", "channel": name, "user_id": member[0]})
        if new and app.webhooks:  # every new subscription changes the count, as every leave
            self._emit_subscription_count(app, name)
        if kind.cache:
            self._replay_cache(conn, name)

    def unsubscribe(self, conn, name):
        change = self.adapter.unsubscribe(conn, name)
        if change is not None:
            self._left(conn.app, change)

    def _left(self, app, change):
        name, vacated, removed = change
        if removed is not None:
            self.adapter.publish(app.id, name, build_frame(protocol.member_removed(name, removed)))
            self.webhooks.emit(app, {"name": "member_removed", "channel": name,
                                     "user_id": removed})
        if vacated:
            self.webhooks.emit(app, {"name": "channel_vacated", "channel": name})
        elif app.webhooks:
            self._emit_subscription_count(app, name)

    def cluster_removals(self, vacated, removed, offline):
        """Announce what a dead node's departure (or another node's report) removed:
        [(app_id, channel)], [(app_id, channel, user_id)], [(app_id, user_id)]."""
        for app_id, channel, user_id in removed:
            app = self.apps.by_id(app_id)
            if app is not None:
                self._left(app, (channel, False, user_id))
        for app_id, channel in vacated:
            app = self.apps.by_id(app_id)
            if app is not None:
                self.webhooks.emit(app, {"name": "channel_vacated", "channel": channel})
        for app_id, user_id in offline:
            app = self.apps.by_id(app_id)
            if app is not None:
                self._tell_watchers(app, user_id, "offline")

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
        for channel in channels:
            if channel_kind(channel).cache:
                self.adapter.cache_set(app.id, channel, name, data, self.settings.cache_ttl)
            self.adapter.publish(app.id, channel,
                                 build_frame(protocol.event(name, channel, data)), socket_id)

    def client_event(self, conn, channel, name, data, user_id):
        app = conn.app
        self.adapter.publish(app.id, channel,
                             build_frame(protocol.event(name, channel, data, user_id)),
                             conn.socket_id)
        if app.webhooks:
            hook = {"name": "client_event", "channel": channel, "event": name,
                    "data": data_string(data), "socket_id": conn.socket_id}
            if user_id is not None:
                hook["user_id"] = user_id
            self.webhooks.emit(app, hook)
        self.hooks.emit("client_event", conn, {"event": name, "channel": channel, "data": data})

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
            conn.send_error(PusherError.WATCHLIST_LIMIT,
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


# -------------------------------------------------------------------- Flask

def create_app(settings=None, core=None):
    """The WSGI application: the Pusher WebSocket endpoint and the HTTP API."""
    from . import api  # the blueprint imports this module's siblings only

    if settings is None:
        settings = core.settings if core is not None else load_settings([])
    core = core if core is not None else BunPulse(settings)
    app = Flask("bunpulse")
    app.extensions["bunpulse"] = core
    # No API body needs more than a full batch of the largest events allowed: refuse bigger
    # ones (413) before reading them, rather than hold them in memory.
    app.config["MAX_CONTENT_LENGTH"] = 256 * 1024 + 2 * max(
        a.max_event_data_size * max(a.max_batch_size, 1) for a in core.apps)
    app.register_blueprint(api.blueprint)

    def serve_socket(environ):
        core.serve_websocket(environ["wsgi.websocket"], core.admit(
            api.request_path(environ), api.query_params(environ)))

    # Every upgrade goes straight to serve_socket (upgrade_shortcut below): Flask's request
    # context and routing were a third of a connect's CPU. The routes stay so that Flask
    # answers plain HTTP there with 426; their view runs only if the shortcut is bypassed.
    @app.route("/app/<path:key>", websocket=True)
    @app.route("/", websocket=True, defaults={"key": None})
    @app.route("/<path:key>", websocket=True)
    def pusher_socket(key):
        serve_socket(request.environ)
        return ""

    flask_wsgi_app = api.publish_shortcut(app.wsgi_app, core, app.config["MAX_CONTENT_LENGTH"])

    def upgrade_shortcut(environ, start_response):
        if environ.get("wsgi.websocket") is not None:
            serve_socket(environ)
            return []
        return flask_wsgi_app(environ, start_response)

    app.wsgi_app = upgrade_shortcut

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if isinstance(exc, WebsocketMismatch):
            if request.path.startswith("/app/"):
                return jsonify(error="This is the Pusher WebSocket endpoint: connect with a "
                                     "WebSocket client"), 426
            return jsonify(error=f"Not found: {request.path}"), 404
        if isinstance(exc, MethodNotAllowed) and not _http_route_exists():
            # Only the WebSocket catch-all matched (POST /foo): the path is unknown.
            return jsonify(error=f"Not found: {request.path}"), 404
        # Keep the exception's headers (Allow on a 405), not its HTML Content-Type.
        return jsonify(error=exc.description), exc.code, [
            h for h in exc.get_headers() if h[0].lower() != "content-type"]

    def _http_route_exists():
        try:
            app.url_map.bind_to_environ(request.environ).match(method="GET", websocket=False)
        except MethodNotAllowed:
            return True
        except HTTPException:
            return False
        return True

    app.on_worker_stop = core.shutdown
    app.handshake_timeout = settings.handshake_timeout / 1000  # read by the handler
    app.keepalive_timeout = settings.keepalive_timeout / 1000
    return app


# -------------------------------------------------------------------- running it

def _listener(settings):
    host = listen_host(settings)
    if host.startswith("unix:"):
        from gevent import socket as gsocket
        path = host[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)
        sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(2048)
        return sock
    return host, settings.port


def log_startup(settings, core, address):
    where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
    log.info("BunPulse listening on %s: WebSocket ws://%s/app/{key}, HTTP API http://%s/apps/"
             "{id}/..., health http://%s/health", where, where, where, where)
    for app in core.apps:
        log.info("app id=%s key=%s client_events=%s webhooks=%d", app.id, app.key,
                 app.client_events, len(app.webhooks))
    if uses_dev_app(settings):
        log.warning("NO CREDENTIALS CONFIGURED: serving the development app (id app-id, key "
                    "app-key, secret app-secret) on 127.0.0.1 only. Set PUSHER_APP_ID, "
                    "PUSHER_APP_KEY and PUSHER_APP_SECRET (or --apps-file) for real use.")
    log.info("adapter: %s", f"redis {redacted(settings.redis_url)}" if settings.redis_url
             else "local (one process)")


def make_wsgi_server(settings, core=None):
    core = core if core is not None else BunPulse(settings)
    app = create_app(settings, core)
    server = WSGIServer(_listener(settings), app, handler_class=PusherWebSocketHandler,
                        log=None, error_log=logging.getLogger("bunpulse.wsgi"))
    PusherWebSocketHandler.max_buffer = settings.max_buffer
    return server, core


class BunPulseServer:
    """A running server returned by `start_bunpulse`.

    If the host program is monkey-patched by gevent, the server runs in its greenlets;
    otherwise it runs in a thread of its own with its own gevent hub, and calls from other
    threads are handed to that hub."""

    def __init__(self, settings):
        self.settings = settings
        self.core = BunPulse(settings)
        self._wsgi = None
        self._loop = None
        self._thread = None
        self._ready = threading.Event()
        self._halt = None  # set in the server's own thread: gevent events belong to one hub
        self._error = None

    @property
    def port(self):
        return self._wsgi.server_port

    @property
    def host(self):
        return self._wsgi.server_host

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def start(self):
        from gevent import monkey
        if monkey.is_module_patched("socket"):
            self._start_here()
        elif self.settings.redis_url:
            raise ConfigError("redis_url needs a gevent-patched process (gevent.monkey."
                              "patch_all() before other imports): redis-py would block the "
                              "server's thread otherwise")
        else:
            self._thread = threading.Thread(target=self._run_in_thread, name="bunpulse",
                                            daemon=True)
            self._thread.start()
            self._ready.wait(10)
            if self._error is not None:
                raise self._error
        return self

    def _start_here(self):
        self._wsgi, _ = make_wsgi_server(self.settings, self.core)
        self._wsgi.start()
        self._loop = gevent.get_hub().loop
        log_startup(self.settings, self.core, self._wsgi.address)

    def _run_in_thread(self):
        try:
            self._start_here()
        except Exception as exc:  # noqa: BLE001 - reported to the caller of start()
            self._error = exc
            self._ready.set()
            return
        self._halt = gevent.event.Event()
        self._ready.set()
        self._halt.wait()

    def _call(self, func, *args):
        """Run func in the server's hub and return its result."""
        if self._thread is None or threading.current_thread() is self._thread:
            return func(*args)
        done, box = threading.Event(), {}

        def run():
            try:
                box["result"] = func(*args)
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc
            finally:
                done.set()

        self._loop.run_callback_threadsafe(lambda: gevent.spawn(run))
        done.wait(30)
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def app(self, app_id=None):
        apps = self.core.apps
        return next(iter(apps)) if app_id is None else apps.by_id(app_id)

    def publish(self, channel, message, app_id=None):
        """Publish {"event", "data", "socket_id"?} (or a list of channels) to every subscriber."""
        channels = [channel] if isinstance(channel, str) else list(channel)
        return self._call(self.core.trigger, self.app(app_id), channels, message["event"],
                          message.get("data", "{}"), message.get("socket_id"))

    def on(self, event, callback):
        """Call callback(connection, data) on 'connection', 'disconnect', 'client_event' or
        any client event name such as 'pusher:subscribe'."""
        return self.core.hooks.on(event, callback)

    def stop(self):
        def stop_here():
            self.core.shutdown()
            gevent.sleep(0.05)
            self._wsgi.stop(timeout=1)
            if self._halt is not None:
                # Release the thread from inside its hub: once the listener is gone the hub
                # has nothing left to wait on, and a later wake-up would find LoopExit.
                self._halt.set()
        self._call(stop_here)
        if self._thread is not None:
            self._thread.join(5)


def start_bunpulse(port=6001, **options):
    """Start serving and return the server (see BunPulseServer). Options are the settings of
    `python -m bunpulse --help`, by name: host, app_id, heartbeat_interval, ..."""
    options["port"] = port
    settings = load_settings(None, overrides=options)
    return BunPulseServer(settings).start()


def serve_forever(settings):
    """The embedded server of `python -m bunpulse` (the process is already monkey-patched)."""
    server, core = make_wsgi_server(settings)
    server.start()
    log_startup(settings, core, server.address)
    stop = gevent.event.Event()
    import signal
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    log.info("shutting down: telling clients to reconnect (4200)")
    core.shutdown()
    gevent.sleep(0.2)
    server.stop(timeout=2)
