"""The embedded gevent server: `python -m bunpulse` (`serve_forever`) and the library API
(`start_bunpulse`, `BunPulseServer`). pywsgi's server accepts; serving/loop.py and
serving/handler.py read and serve."""
import logging
import os
import signal

import gevent
import gevent.event
from gevent import monkey
from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer

from ..config import ConfigError, listen_host, load_settings
from ..core import BunPulse
from ..metrics import serve_in_gevent
from ..startup import log_startup, tune_gc
from ..tls import server_context
from ..wsgi import create_app
from .accept import PausingAccept
from .handler import RequestHandler
from .hub_thread import HubThread
from .loop import LoopAccept

log = logging.getLogger("bunpulse")


def _listener(settings):
    host = listen_host(settings)
    if host.startswith("unix:"):
        path = host[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)
        sock = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(settings.backlog)  # (a TCP listener gets it from the server)
        return sock
    return host, settings.port


def _log_startup(settings, core, address):
    log_startup(settings, core.apps,
                address if isinstance(address, str) else f"{address[0]}:{address[1]}")


class PusherWSGIServer(PausingAccept, LoopAccept, WSGIServer):
    """pywsgi's server, quiet, paused at the file-descriptor limit, and reading new
    connections in the event loop."""


def make_wsgi_server(settings, core=None):
    if settings.workers > 1:  # accepted and ignored, it would promise what does not happen
        raise ConfigError(f"--workers={settings.workers}: the embedded server runs one process; "
                          "several workers are gunicorn's (gunicorn -c gunicorn.conf.py, with "
                          "BUNPULSE_WORKERS and BUNPULSE_REDIS_URL)")
    context = server_context(settings)  # before anything starts: a bad file is a ConfigError
    core = core if core is not None else BunPulse(settings)
    app = create_app(settings, core)
    listener = _listener(settings)
    backlog = None if hasattr(listener, "accept") else settings.backlog  # a unix socket listens
    tls = {"ssl_context": context} if context is not None else {}
    server = PusherWSGIServer(listener, app, backlog=backlog,
                              handler_class=RequestHandler, log=None,
                              error_log=logging.getLogger("bunpulse.wsgi"), **tls)
    core.dev_app.bound_to([listen_host(settings)])  # a public host was refused by config.py
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
        self._hub = None  # the HubThread, when the server runs in a thread of its own

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
            self._hub = HubThread(setup=self._start_here)
        return self

    def _start_here(self):
        self._wsgi, _ = make_wsgi_server(self.settings, self.core)
        self._wsgi.start()
        self._metrics = start_metrics(self.settings)
        self.core.metrics.start_flushing()  # here, in the hub that serves (it may be a thread's)
        _log_startup(self.settings, self.core, self._wsgi.address)

    def _call(self, func, *args):
        """Run func in the server's hub and return its result."""
        return func(*args) if self._hub is None else self._hub.call(func, *args)

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
        self._call(stop_here)
        if self._hub is not None:
            self._hub.stop()


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
    tune_gc()
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
