"""BunPulse's gunicorn worker (public name `bunpulse.worker.PusherWorker`): the only module
that imports gunicorn, so that the library and the embedded server never do. gunicorn's server
accepts; serving/loop.py and serving/handler.py read and serve; the stop is the context's."""
import logging
import socket
import ssl
import sys
import time

import gevent
from geventwebsocket.gunicorn.workers import GeventWebSocketWorker
from gunicorn.arbiter import Arbiter
from gunicorn.workers.ggevent import PyWSGIServer

from ..context import context_of
from ..devapp import REFUSED
from ..startup import tune_gc
from .accept import PausingAccept
from .handler import RequestHandler
from .loop import LoopAccept

log = logging.getLogger("bunpulse.worker")
WORKER_BOOT_ERROR = Arbiter.WORKER_BOOT_ERROR


class PusherPyWSGIServer(PausingAccept, LoopAccept, PyWSGIServer):
    """gunicorn's server, paused at the file-descriptor limit, reading new connections in
    the event loop."""


class PusherWorker(GeventWebSocketWorker):
    """gunicorn's gevent WebSocket worker with our handler and a server that pauses at the
    file-descriptor limit; when the worker is told to stop, it stops accepting and BunPulse's
    context (found also through a host application) stops, so clients get 4200 and reconnect
    at once, to the workers that replace this one."""

    wsgi_handler = RequestHandler

    def run(self):
        context = context_of(self.wsgi)
        hosts = [s.getsockname()[0] if s.family != socket.AF_UNIX else "" for s in self.sockets]
        if context is not None and not context.core.dev_app.bound_to(hosts):
            log.error("bunpulse: configuration error: %s listens on %s: %s", self.cfg.bind,
                      ", ".join(map(str, hosts)), REFUSED)
            sys.exit(WORKER_BOOT_ERROR)  # gunicorn's master stops rather than respawn it
        tune_gc()
        self._servers = []
        self._addresses = [(s.family, s.getsockname()) for s in self.sockets]
        stopping = gevent.spawn(self._stop_when_told)
        super().run()
        # gunicorn's run returns once no request is in flight, and WebSockets are not
        # requests once upgraded (the event loop serves them): their 4200 comes from here.
        stopping.join(self.cfg.graceful_timeout)

    def server_class(self, *args, **kwargs):
        # gunicorn closes its servers up to a second after the worker was told to stop; they
        # are kept to close them at once, so that no client reconnects to a stopping worker.
        server = PusherPyWSGIServer(*args, **kwargs)
        self._servers.append(server)
        return server

    def handle_exit(self, sig, frame):
        self._drain()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig, frame):
        self._drain()
        super().handle_quit(sig, frame)

    def _drain(self):
        # From the signal handler: /health and /ready say 503 at once, so that a sibling
        # told to stop at the same moment never passes for a successor (see below).
        context = context_of(self.wsgi)
        if context is not None:
            context.draining()

    def _stop_when_told(self):
        while self.alive:
            gevent.sleep(0.1)
        self._drain()
        for server in self._servers:
            server.close()
        # On a reload the clients are told to reconnect only once a successor answers on our
        # address: events published meanwhile still reach them here (through Redis).
        # The stop itself takes up to --shutdown-grace-ms: kept out of graceful_timeout.
        context = context_of(self.wsgi)
        grace = context.settings.shutdown_grace_ms / 1000 if context is not None else 0
        deadline = time.monotonic() + max(0.0, self.cfg.graceful_timeout - grace)
        gevent.sleep(0.2)  # the siblings stopped with this worker have heard it too
        while time.monotonic() < deadline and self._successor() == "pending":
            gevent.sleep(0.1)
        if context is not None:
            try:
                context.stop()
            except Exception:  # noqa: BLE001 - shutting down regardless
                log.exception("stopping BunPulse failed")

    def _successor(self):
        """'ready' when another (new) worker answers GET /ready with 200 on our address,
        'none' when nothing listens there any more (the whole server is stopping), else
        'pending' (the master still listens: new workers are on their way)."""
        state = "none"
        for family, address in self._addresses:
            if family != socket.AF_UNIX:
                host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address[0], address[0])
                address = (host, address[1])
            try:
                with gevent.Timeout(0.5), socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.connect(address)
                    state = "pending"
                    if self.cfg.is_ssl:
                        probe = ssl._create_unverified_context().wrap_socket(probe)
                    probe.sendall(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    if b" 200 " in probe.recv(64).split(b"\r\n")[0]:
                        return "ready"
            except (OSError, gevent.Timeout):
                pass
        return state
