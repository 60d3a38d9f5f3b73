"""BunPulse under a WSGI server that runs threads, not greenlets: Werkzeug's development server
(`flask --app bunpulse run`, with or without --debug and its reloader). Werkzeug reads each
request's head itself: no 64 KiB cap applies to it (the README says so), and the deadline comes
from the request handler class arm_werkzeug_head_deadline gives Werkzeug.

The core runs in a gevent hub in a thread of its own (threads.HubThread). Each HTTP request's
body is read in the server's thread, exactly Content-Length bytes (Werkzeug's wsgi.input is the
raw stream: reading past them would wait for the client), and the request is answered in the
hub. A WebSocket upgrade gets its 101 here, written on the socket Werkzeug hands over
(`werkzeug.socket`); the connection then runs on BunPulse's own transport, read by the hub's
event loop (on a duplicate of the socket), while the server's thread waits for it to end."""
import atexit
import io
import logging
import os
import signal
import socket
import sys
import threading

import gevent
from gevent.hub import Hub

from .. import api
from ..errors import ApiError
from ..handshake import Refusal, accept_environ
from ..request import TOO_SLOW
from ..websocket import PusherWebSocket, serve_upgraded
from .body import buffered_ahead, read_body, shut_reading
from .hub_thread import HubThread

log = logging.getLogger("bunpulse")


def in_a_hub():
    """Whether this request runs in a greenlet of a running gevent hub (a gevent server: the
    embedded one, gunicorn's workers) or in the hub's event loop itself (reception.py),
    rather than in a plain thread."""
    return isinstance(gevent.getcurrent(), (gevent.Greenlet, Hub))


class ThreadedDispatch:
    """The WSGI callable for a process that gevent does not patch: requests that arrive in a
    hub's greenlets go straight to `dispatch`, the others are handed to the core's hub."""

    def __init__(self, dispatch, context):
        self._dispatch = dispatch
        self._context = context
        self._core = context.core
        _exit_on_sigterm()
        self._hub = None
        self._lock = threading.Lock()

    @property
    def hub(self):
        if self._hub is None:  # started by the first request: never in a reloader's watcher
            with self._lock:
                if self._hub is None:
                    self._hub = HubThread(name="bunpulse-hub",
                                          setup=self._core.metrics.start_flushing)
                    atexit.register(self._stop)
        return self._hub

    def _stop(self):
        """At exit (SIGTERM included, see _exit_on_sigterm): clients are told 4200, as every
        other way tells them when it stops."""
        try:
            self._hub.call(self._context.stop,
                           timeout=self._context.settings.shutdown_grace_ms / 1000 + 2)
        except Exception:  # noqa: BLE001 - exiting regardless
            log.exception("stopping BunPulse failed")

    def call(self, func, *args):
        """func(*args) in the core's hub, from any thread; its result."""
        if in_a_hub():
            return func(*args)
        return self.hub.call(func, *args)

    def __call__(self, environ, start_response):
        if in_a_hub():
            return self._dispatch(environ, start_response)
        if environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            return self._upgrade(environ, start_response)
        sock = environ.get("werkzeug.socket")
        timeout = sock.gettimeout() if sock is not None else None
        try:
            if sock is not None:  # the body within the handshake timeout, as on every way
                sock.settimeout(self._context.handshake_timeout)
            body = read_body(environ, self._context.max_body)
        except ApiError as exc:  # where a next request would start is not known: close
            return api.refusal(start_response, exc, close=True)
        finally:
            if sock is not None:
                sock.settimeout(timeout)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("wsgi.input_terminated", None)
        status, headers, answer = self.hub.call(_respond, self._dispatch, environ)
        start_response(status, headers)
        return [answer]

    def _upgrade(self, environ, start_response):
        sock = environ.get("werkzeug.socket")
        if sock is None or environ.get("REQUEST_METHOD") != "GET" \
                or "upgrade" not in environ.get("HTTP_CONNECTION", "").lower():
            return api.refusal(start_response, ApiError(
                400, "Not a WebSocket upgrade this server can hand over: use GET with "
                     "Connection: Upgrade under flask run, gunicorn or python -m bunpulse"))
        handshake = accept_environ(environ, self._context.compression)
        if isinstance(handshake, Refusal):
            return api.refusal(start_response, ApiError(handshake.status, handshake.message),
                               headers=handshake.headers)
        ahead = buffered_ahead(environ["wsgi.input"], sock)
        ended = threading.Event()
        self.hub.spawn(self._session, os.dup(sock.fileno()), ahead, handshake, environ, ended)
        ended.wait()
        try:  # the hub closed its duplicate: the connection ends with this one
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # Werkzeug writes this status once the application returns (and logs it): the socket
        # is shut down by now, so the write fails as a dropped connection, quietly.
        start_response("101 Switching Protocols", [])
        return []

    def _session(self, fd, ahead, handshake, environ, ended):
        """In the hub: the socket (a duplicate of Werkzeug's) is served by
        websocket.serve_upgraded, as every driver's are, its 101 sent with the first frames;
        `ended` is set once the connection is over and the duplicate closed. No greenlet
        waits meanwhile."""
        raw = socket.socket(fileno=fd)
        raw.setblocking(False)
        ws = None
        try:
            ws = PusherWebSocket(raw, ahead, handshake.answer, handshake.deflate)
            ws.outbox.on_released = ended.set
            serve_upgraded(self._context, ws, environ)
        except Exception:  # noqa: BLE001 - one connection's bug must not take the hub down
            log.exception("WebSocket session failed")
            if ws is None:
                raw.close()
                ended.set()


def arm_werkzeug_head_deadline(context):
    """Werkzeug's server reads each request head in its thread, with no timeout, before
    BunPulse is called: a client that sends nothing, or one byte a second, would hold a thread
    for good. The request handler class Werkzeug's servers default to becomes one that gives each
    head --handshake-timeout. `flask run` loads the application before it makes its server,
    so the server it makes uses it."""
    from werkzeug import serving

    class HeadDeadlineHandler(serving.WSGIRequestHandler):
        """From when the handler waits for a request until its head is read, a timer runs;
        when it fires the socket's reading side is shut, so the read ends, and a head that had
        begun gets 408."""

        head_timeout = context.handshake_timeout

        def handle_one_request(self):
            self._late = False
            self._timer = timer = threading.Timer(self.head_timeout, self._head_too_slow)
            timer.daemon = True
            timer.start()
            try:
                super().handle_one_request()
            finally:
                timer.cancel()

        def parse_request(self):
            try:
                parsed = super().parse_request()
            finally:
                self._timer.cancel()
            if self._late:  # the head ended because the timer shut the socket
                self.close_connection = True
                try:
                    self.wfile.write(TOO_SLOW.answer())
                except OSError:
                    pass
                return False
            return parsed

        def _head_too_slow(self):
            self._late = True
            shut_reading(self.connection)

    if getattr(serving.WSGIRequestHandler, "head_timeout", None) is None:
        serving.WSGIRequestHandler = HeadDeadlineHandler


def _exit_on_sigterm():
    """Werkzeug's server dies of SIGTERM at once (its reloader's child excepted, which exits):
    as that child does, make SIGTERM an exit, so that the exit tells clients 4200. Only in
    the main thread of a program that left SIGTERM alone."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *args: sys.exit(0))


def _respond(app, environ):
    """Run a WSGI app to the end: (status, headers, body)."""
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, headers

    chunks = app(environ, start_response)
    try:
        body = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    return answer["status"], answer["headers"], body
