"""Running BunPulse: the embedded gevent server (`serve_forever`, `python -m bunpulse`), the
library API (`start_bunpulse`, `BunPulseServer`) and the start-up log, shared with gunicorn."""
import logging
import os
import signal
import threading

import gevent
import gevent.event
from gevent import monkey
from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer

from .config import ConfigError, listen_host, load_settings
from .core import BunPulse
from .metrics import serve_in_gevent
from .startup import log_startup
from .tls import server_context
from .transport import PusherWebSocketHandler
from .wsgi import create_app

log = logging.getLogger("bunpulse")


def _listener(settings):
    host = listen_host(settings)
    if host.startswith("unix:"):
        path = host[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)
        sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(2048)
        return sock
    return host, settings.port


def _log_startup(settings, core, address):
    log_startup(settings, core.apps,
                address if isinstance(address, str) else f"{address[0]}:{address[1]}")


def make_wsgi_server(settings, core=None):
    context = server_context(settings)  # before anything starts: a bad file is a ConfigError
    core = core if core is not None else BunPulse(settings)
    app = create_app(settings, core)
    tls = {"ssl_context": context} if context is not None else {}
    server = WSGIServer(_listener(settings), app, handler_class=PusherWebSocketHandler,
                        log=None, error_log=logging.getLogger("bunpulse.wsgi"), **tls)
    return server, core


def start_metrics(settings):
    """The metrics listener of the embedded server, or None when it is off."""
    if settings.metrics_port is None:
        return None
    return serve_in_gevent(settings.metrics_host, settings.metrics_port)


class BunPulseServer:
    """A running server returned by `start_bunpulse`.

    If the host program is monkey-patched by gevent, the server runs in its greenlets;
    otherwise it runs in a thread of its own with its own gevent hub, and calls from other
    threads are handed to that hub."""

    def __init__(self, settings):
        self.settings = settings
        self.core = BunPulse(settings)
        self._wsgi = None
        self._metrics = None
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
        return f"{'https' if self.settings.ssl_cert else 'http'}://{self.host}:{self.port}"

    @property
    def metrics_port(self):
        return self._metrics.server_port if self._metrics is not None else None

    def start(self):
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
        self._metrics = start_metrics(self.settings)
        self._loop = gevent.get_hub().loop
        _log_startup(self.settings, self.core, self._wsgi.address)

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
            if self._metrics is not None:
                self._metrics.stop(timeout=1)
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
    metrics = start_metrics(settings)
    _log_startup(settings, core, server.address)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    log.info("shutting down: telling clients to reconnect (4200)", extra={"event": "stopping"})
    core.shutdown()
    gevent.sleep(0.2)
    server.stop(timeout=2)
    if metrics is not None:
        metrics.stop(timeout=1)
    log.info("BunPulse stopped", extra={"event": "stop"})
