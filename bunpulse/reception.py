"""New connections read by the event loop until their request is known: no greenlet per accept.

A WebSocket upgrade and a publish call whose whole request came in one read are served right
in the event loop's callback (transport.upgrade_at_once, answer_publish), and a keep-alive
publisher's connection then waits for its next request in the event loop too. Anything else (a
head in pieces, another route, a body still coming, an answer that did not fit the socket) is
handed, with every byte read so far, to a greenlet running the server's own handler, as an
accepted connection always was. So is everything while the application cannot serve in the
event loop, where nothing may wait (Redis, hooks: `serves_at_once`), and every TLS connection.

`LoopAccept` is mixed into a gevent StreamServer (pywsgi's in run.py, gunicorn's in worker.py).
"""
import logging
import _socket

from gevent import get_hub
from gevent.baseserver import _handle_and_close_when_done
from gevent.socket import socket as GeventSocket

from .transport import (FIRST_READ, HANDSHAKE_TIMEOUT, KEEPALIVE_TIMEOUT,
                        answer_publish, publish_request, set_nodelay, upgrade_at_once)

log = logging.getLogger("bunpulse.transport")
_EV_READ = 1
MAX_PIECES = 8            # reads a request may come in and still be served in the loop
MAX_GATHERED = 64 * 1024  # bytes of a request gathered in the loop at most


class LoopAccept:
    """Mix into a gevent StreamServer (before it): accepted plain connections start as a
    `Reception`; TLS ones are served as gevent serves them."""

    def init_socket(self):
        super().init_socket()
        set_nodelay(self.socket)  # accepted sockets inherit it: no call per connection

    def do_read(self):
        if self.ssl_enabled:
            return super().do_read()
        listener = self.socket
        try:
            fd, address = listener._accept()
        except BlockingIOError:
            return None
        raw = _socket.socket(listener.family, listener.type, listener.proto, fd)
        raw.setblocking(False)
        return raw, address

    def do_handle(self, *args):
        if self.ssl_enabled:
            return super().do_handle(*args)
        Reception(self, *args).start()
        return None

    def handle_in_greenlet(self, raw, address, ahead=b"", unsent=b""):
        """Serve the connection as gevent would have from its accept, in a greenlet with the
        server's handler, which starts with the bytes read (`ahead`) and those still to write
        (`unsent`)."""
        sock = GeventSocket(raw.family, raw.type, raw.proto, raw.detach())
        self._spawn(_handle_and_close_when_done, self._handle_read, self.do_close,
                    (sock, address, ahead, unsent))

    def _handle_read(self, sock, address, ahead, unsent):
        handler = self.handler_class(sock, address, self)
        handler.ahead, handler.unsent = ahead, unsent
        handler.handle()


class Reception:
    """One connection read by the event loop until its request is served or handed on.

    It waits on a read watcher with a timer: the handshake timeout for the first request, the
    keep-alive timeout for a later one; a client that has not sent a whole request in time is
    closed. A request that comes in pieces is gathered for a few reads (a body sent behind its
    head, a read that ended mid-request), then handed on, so that a client sending a byte at a
    time costs the loop a bounded amount of work."""

    __slots__ = ("_server", "_raw", "_address", "_watcher", "_timer", "_partial", "_pieces")

    def __init__(self, server, raw, address):
        self._server = server
        self._raw = raw
        self._address = address
        self._watcher = None
        self._timer = None
        self._partial = b""  # the start of a request, waiting for the rest
        self._pieces = 0     # reads gathered into it

    def start(self):
        # A new client usually sends its request with its connection: read it at once.
        try:
            data = self._raw.recv(FIRST_READ)
        except (BlockingIOError, InterruptedError):
            self._wait(getattr(self._server.application, "handshake_timeout",
                               HANDSHAKE_TIMEOUT))
            return
        except OSError:
            data = b""
        self._serve(data)

    def _wait(self, timeout=None):
        """Read on when the socket says it is readable, and close the connection once
        `timeout` seconds have passed (None: the request's time runs on)."""
        loop = get_hub().loop
        if self._watcher is None:
            self._watcher = loop.io(self._raw.fileno(), _EV_READ)
        if timeout is None and self._timer is None:
            timeout = getattr(self._server.application, "handshake_timeout", HANDSHAKE_TIMEOUT)
        if timeout is not None:
            if self._timer is not None:
                self._timer.close()
            self._timer = loop.timer(timeout)
            self._timer.start(self._close)
        self._watcher.start(self._readable)

    def _readable(self):
        try:
            data = self._raw.recv(FIRST_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._watcher.stop()
        if self._partial:
            if not data:  # the client stopped mid-request: the handler answers that (400)
                self._hand_on(self._partial)
                return
            data = self._partial + data
            self._partial = b""
        self._serve(data)

    def _serve(self, data):
        if not data:
            self._close()
            return
        try:
            self._serve_requests(data)
        except Exception:  # noqa: BLE001 - one connection's error must never reach the loop
            log.exception("error serving a request")
            self._close()

    def _serve_requests(self, data):
        app = self._server.application
        while True:
            if not getattr(app, "serves_at_once", _no)():
                self._hand_on(data)
                return
            # (A head with bare line feeds, which pywsgi reads, is handed on too.)
            whole_head = b"\r\n\r\n" in data
            if whole_head and upgrade_at_once(app, data, self._take_socket, self._address):
                self._forget()
                return
            request = publish_request(app, data) if whole_head else None
            if request is None and whole_head:
                self._hand_on(data)  # not a publish call: pywsgi's
                return
            if request is None or len(data) < request.body_end:
                self._gather(data)
                return
            response = answer_publish(app, request, data, self._address)
            if response is None:
                self._hand_on(data)
                return
            self._pieces = 0
            data = data[request.body_end:]
            try:
                sent = self._raw.send(response)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close()
                return
            if sent < len(response):
                self._hand_on(data, response[sent:])  # the handler writes the rest
                return
            if not request.keep_alive:
                self._close()
                return
            if not data:
                self._wait(getattr(app, "keepalive_timeout", KEEPALIVE_TIMEOUT))
                return

    def _gather(self, data):
        """The start of a request: wait for the rest, for a few reads at most."""
        if self._pieces >= MAX_PIECES or len(data) > MAX_GATHERED:
            self._hand_on(data)
            return
        self._pieces += 1
        self._partial = data
        self._wait()

    def _take_socket(self):
        return self._raw

    def _hand_on(self, data, unsent=b""):
        raw = self._raw
        self._forget()
        self._server.handle_in_greenlet(raw, self._address, data, unsent)

    def _forget(self):
        """The socket is someone else's now (or closed): stop watching it."""
        for watcher in (self._watcher, self._timer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self._watcher = self._timer = None
        self._raw = None

    def _close(self):
        raw = self._raw
        self._forget()
        if raw is not None:
            raw.close()


def _no():
    return False
