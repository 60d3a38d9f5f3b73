"""New connections read by the event loop until their request is known: no greenlet per accept.

Mixed into the gevent servers of `python -m bunpulse` and of BunPulse's gunicorn worker
(`LoopAccept`). Each new connection is a `Reception`: its bytes go to the one request reader
(request.py), with a timer at the reader's deadline. Where a request is served is decided
once, by `in_the_loop`; everything else goes, with the reader and every byte read, to the
handler greenlet (serving/handler.py), which goes on under the same deadline.
"""
import logging
import time
import _socket

import gevent
from gevent import get_hub
from gevent.baseserver import _handle_and_close_when_done
from gevent.socket import socket as GeventSocket

from ..context import context_of
from ..handshake import Refusal, accept_request
from ..websocket import PusherWebSocket, serve_upgraded
from .handler import remote_address

log = logging.getLogger("bunpulse.transport")
_EV_READ = 1
FIRST_READ = 16384        # bytes asked of a new connection at first: a head is far smaller
MAX_PIECES = 8            # reads a request may come in and still be served in the loop
MAX_GATHERED = 64 * 1024  # bytes of a request gathered in the loop at most


def in_the_loop(context, application):
    """Whether the event loop's callback may serve a complete request itself, or a greenlet
    must. The loop must never wait, so it serves only what cannot: a WebSocket upgrade or a
    publish call (any other route goes to a greenlet), for BunPulse's own application (a
    host's code may wait), when the core says nothing it does can (no Redis, no hook on
    connections, no dashboard viewer). Asked for each request: a viewer may come meanwhile."""
    return context.serves_directly(application) and context.serves_in_the_loop()


def set_nodelay(sock):
    # An answer's head and body may leave in two writes: with Nagle on, the body would wait
    # for the client's delayed ACK on every keep-alive HTTP API request.
    if sock.family != _socket.AF_UNIX:
        try:
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        except OSError:
            pass


class LoopAccept:
    """Mix into a gevent StreamServer (before it): accepted plain connections start as a
    `Reception`; TLS ones go to the handler greenlet, their TLS handshake under the deadline."""

    _context = None

    def init_socket(self):
        super().init_socket()
        set_nodelay(self.socket)  # accepted sockets inherit it: no call per connection

    @property
    def bunpulse_context(self):
        """The context of the application served (looked up once)."""
        if self._context is None:
            self._context = context_of(self.application)
        return self._context

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

    def wrap_socket_and_handle(self, client_socket, address):
        # The TLS handshake counts against the request's deadline: a silent TCP connection
        # on a TLS port is closed like any other.
        context = self.bunpulse_context
        reader = context.reader()
        try:
            with gevent.Timeout(context.handshake_timeout):
                ssl_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except (gevent.Timeout, OSError):
            client_socket.close()
            return None
        return self._serve(ssl_socket, address, reader)

    def handle_in_greenlet(self, raw, address, reader, request=None, unsent=b""):
        """Serve the connection in a greenlet with the server's handler, which goes on with
        the loop's reader, the request it read (if any) and the answer's unwritten end."""
        sock = GeventSocket(raw.family, raw.type, raw.proto, raw.detach())
        self._spawn(_handle_and_close_when_done, self._serve, self.do_close,
                    (sock, address, reader, request, unsent))

    def _serve(self, sock, address, reader, request=None, unsent=b""):
        handler = self.handler_class(sock, address, self)
        handler.reader, handler.pending, handler.unsent = reader, request, unsent
        handler.handle()


class Reception:
    """One connection read by the event loop until its request is served or handed on."""

    __slots__ = ("_server", "_raw", "_address", "_watcher", "_timer", "_reader", "_pieces",
                 "_context", "_app", "_remote")

    def __init__(self, server, raw, address):
        self._server = server
        self._app = server.application
        self._context = server.bunpulse_context
        self._raw = raw
        self._address = address
        self._remote = remote_address(address)
        self._watcher = None
        self._timer = None
        self._reader = self._context.reader()
        self._pieces = 0  # reads gathered for the current request

    def start(self):
        # A new client usually sends its request with its connection: read it at once.
        self._read()

    def _read(self):
        try:
            data = self._raw.recv(FIRST_READ)
        except (BlockingIOError, InterruptedError):
            self._wait()
            return
        except OSError:
            data = b""
        try:
            self._received(data)
        except Exception:  # noqa: BLE001 - one connection's error must never reach the loop
            log.exception("error serving a request")
            self._close()

    def _wait(self, timeout=None):
        """Read on when the socket is readable; close it at the reader's deadline (`timeout`
        seconds from now, when the caller knows it)."""
        loop = get_hub().loop
        if self._watcher is None:
            self._watcher = loop.io(self._raw.fileno(), _EV_READ)
        if self._timer is not None:
            self._timer.close()
        if timeout is None:
            timeout = max(0.0, self._reader.deadline - time.monotonic())
        self._timer = loop.timer(timeout)
        self._timer.start(self._close)
        self._watcher.start(self._readable)

    def _readable(self):
        self._watcher.stop()
        self._read()

    def _received(self, data):
        reader = self._reader
        if data:
            reader.receive_data(data)
            self._pieces += 1
        else:
            reader.receive_eof()
        while True:
            event = reader.next_event()
            if event is None:
                to_send = reader.data_to_send()
                if to_send:  # 100 Continue: written by the handler, which reads the body
                    self._hand_on(None, to_send)
                elif reader.ended:
                    self._close()
                elif self._pieces >= MAX_PIECES or (reader.started and self._pieces * FIRST_READ
                                                     > MAX_GATHERED):
                    self._hand_on()  # a slow or large request: a greenlet reads the rest
                else:
                    self._wait()
                return
            if isinstance(event, Refusal) or not in_the_loop(self._context, self._app):
                self._hand_on(event)
                return
            self._pieces = 0
            if event.upgrade:
                self._upgrade(event)
                return
            answer = self._context.answer_publish(event, self._remote)
            if answer is None:
                self._hand_on(event)  # another route: the WSGI application's
                return
            try:
                sent = self._raw.send(answer)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close()
                return
            if sent < len(answer):
                self._hand_on(None, answer[sent:])  # the handler writes the rest
                return
            if not event.keep_alive:
                self._close()
                return
            if not reader.answered():  # nothing more read yet: the next request, in time
                self._wait(reader.keepalive_timeout)
                return

    def _upgrade(self, request):
        handshake = accept_request(request, self._context.compression)
        if isinstance(handshake, Refusal):
            self._hand_on(handshake)  # written by the greenlet: the loop never waits
            return
        raw = self._raw
        self._forget()
        environ = request.environ(self._remote)
        ws = environ["wsgi.websocket"] = PusherWebSocket(raw, request.ahead, handshake.answer,
                                                         handshake.deflate)
        # BunPulse's own application (in_the_loop said so): straight to the one
        # post-handshake path, without the WSGI call that would lead there.
        serve_upgraded(self._context, ws, environ)

    def _hand_on(self, request=None, unsent=b""):
        raw = self._raw
        self._forget()
        self._server.handle_in_greenlet(raw, self._address, self._reader, request, unsent)

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
