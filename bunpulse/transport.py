"""The WebSocket transport: socket I/O only, and the only module that imports geventwebsocket.

It fixes what gevent-websocket 0.10.1 gets wrong for a Pusher server:
close frames carry a real code, an oversized message is refused from its header (1009) before
its payload is read, unmasking runs in C (wsaccel), invalid UTF-8 closes with 1007 and protocol
errors with 1002, no stray close frame from `__del__`, and no per-address client table (which
breaks on unix sockets). Frames are parsed by frames.FrameParser, which does no I/O. Every write
goes through one Outbox per socket: a non-blocking send, and a bounded buffer drained by a
writer greenlet that exists only while there is a backlog.

The seam: `PusherWebSocket(sock, ahead)` runs on any upgraded raw socket plus the bytes already
read past the handshake; `BunPulse.serve_websocket(ws, admission)` then runs the connection.
"""
import base64
import hashlib
import logging
import socket
import ssl

import gevent
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket

from .errors import ErrorCode, WsClose
from .frames import (OP_BINARY, OP_TEXT, Close, FrameParser, PongDue, Violation, build_frame,
                     close_frame)
from .request_headers import RequestHeaders

log = logging.getLogger("bunpulse.transport")

# An application may leave a callable here in the upgrade request's environ: the handler runs
# it once the application has returned, outside its request context (see run_websocket).
SESSION_KEY = "websocket.session"
CLOSE_LINGER = 3.0  # seconds to wait for the client's close frame before dropping the socket


class ConnectionLost(Exception):
    """The peer went away (EOF or socket error)."""


class Outbox:
    """The single writer of one socket.

    `send` tries a non-blocking write; what does not fit is queued and a writer greenlet is
    spawned to drain it, coalescing everything queued into one write. Past `limit` queued bytes
    the peer is evicted (close 4100, so pusher-js backs off and reconnects).
    """

    __slots__ = ("_sock", "_raw_send", "_pending", "_pending_size", "_writer", "limit",
                 "closed", "close_code", "close_info", "on_evict", "__weakref__")

    def __init__(self, sock, limit, on_evict=None):
        self._sock = sock
        tls = getattr(sock, "_sslobj", None)
        if tls is not None:
            self._raw_send = _tls_send(tls.write)
        else:  # the non-blocking socket under gevent's wrapper
            self._raw_send = getattr(sock, "_sock", sock).send
        self._pending = []
        self._pending_size = 0
        self._writer = None
        self.limit = limit
        self.closed = False
        self.close_code = None  # the code of the close frame this side sent first
        self.on_evict = on_evict
        self.close_info = None  # (code, reason, who closed: "server", "client" or "evicted")

    @property
    def backlog(self):
        return self._pending_size

    def send(self, frame):
        if self.closed:
            return
        if self._writer is not None:
            self._pending.append(frame)
            self._pending_size += len(frame)
            if self._pending_size > self.limit:
                self._evict()
            return
        try:
            sent = self._raw_send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop()
            return
        if sent < len(frame):
            self._pending.append(frame[sent:])
            self._pending_size = len(frame) - sent
            self._writer = gevent.spawn(self._drain)

    def _drain(self):
        pending = self._pending
        try:
            while pending and not self.closed:
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                self._pending_size = 0
                self._sock.sendall(data)
        except OSError:
            self._drop()
        finally:
            self._writer = None

    def _evict(self):
        log.info("evicting a client that stopped reading (%d bytes queued)", self._pending_size)
        self._pending.clear()
        self._pending_size = 0
        self.closed = True
        self.close_code = ErrorCode.OVER_CAPACITY
        self.close_info = (ErrorCode.OVER_CAPACITY, "Client too slow", "evicted")
        try:  # best effort: the socket buffer is probably full
            self._raw_send(close_frame(ErrorCode.OVER_CAPACITY, "Client too slow"))
        except OSError:
            pass
        self.shutdown()
        if self.on_evict is not None:
            self.on_evict()

    def _drop(self):
        self.closed = True
        self._pending.clear()
        self._pending_size = 0

    def close(self, code, reason=""):
        """Queue a close frame after what is pending, then half-close; the reader's linger
        timer drops the socket if the client never answers."""
        if self.closed:
            return
        self.send(close_frame(code, reason))
        self.closed = True
        self.close_code = code
        self.close_info = (code, reason, "server")
        if self._writer is None:
            self._half_close()
        else:
            self._writer.link(lambda _: self._half_close())
        gevent.get_hub().loop.timer(CLOSE_LINGER).start(self.shutdown)

    def _half_close(self):
        if getattr(self._sock, "_sslobj", None) is not None:
            return  # shutdown() would drop TLS for the reads still to come (the client's close)
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def shutdown(self):
        """Drop the connection now: the reader sees EOF and cleans up."""
        self.closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _tls_send(write):
    """A TLS socket's send that never waits: its SSL object's write on the non-blocking socket
    below. A record that does not fit now is written again from its start later, as OpenSSL
    requires (the writer's next write begins with the same bytes)."""
    def send(data):
        try:
            return write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            raise BlockingIOError() from None
    return send


READ_SIZE = 4096  # bytes asked of the socket at once, unless a frame in progress needs more


def _buffered_ahead(handler):
    """What the handler's buffered reader already holds past the handshake (a client may send
    frames right behind it), taken without waiting for more; then the reader is closed, which
    frees its buffer and leaves the socket open."""
    sock = handler.socket
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        data = handler.rfile.read1(1 << 16)
    except OSError:  # nothing buffered and nothing on the socket yet
        data = b""
    finally:
        sock.settimeout(timeout)
    body = handler.wsgi_input
    if body is None or not (body.content_length or body.chunked_input):
        handler.rfile.close()  # pywsgi reads it again only to discard a request body
    return data or b""


class PusherWebSocket(WebSocket):
    """A server-side WebSocket on an upgraded socket: reads drive a FrameParser, and every
    write goes through a single writer (`outbox`).

    `sock`: the raw socket once the handshake is answered; `ahead`: the bytes already read past
    the handshake. Frames are read from the socket itself, not through a buffered reader: an
    idle connection then holds no read buffer, only what a client sent ahead of what has been
    parsed."""

    __slots__ = ("outbox", "close_code", "_recv", "_ahead", "_parser", "_events",
                 "refused_midway")

    def __init__(self, sock, ahead=b""):
        self.environ = None
        self.handler = None
        self.stream = None
        self.closed = False
        self._recv = sock.recv
        self._ahead = ahead
        self._parser = FrameParser()
        self._events = ()  # events parsed and not handled yet (none: no list held)
        self.outbox = Outbox(sock, 1 << 20)  # the core sets its limit (max_buffer)
        self.close_code = None
        self.refused_midway = False  # a frame was refused before its payload was read

    def __del__(self):
        pass  # never send a close frame from the garbage collector

    @property
    def max_message_size(self):
        return self._parser.max_message_size

    @max_message_size.setter
    def max_message_size(self, size):
        self._parser.max_message_size = size

    # ---------------------------------------------------------------- reading

    def _next_event(self):
        events = self._events
        while not events:
            data = self._ahead or self._recv(max(self._parser.missing, READ_SIZE))
            self._ahead = b""
            if not data:
                raise ConnectionLost()
            self._parser.receive_data(data)
            events = self._events = self._parser.events_received()
        event = events.pop(0)
        if not events:
            self._events = ()
        return event

    def receive(self):
        """The next message: str (text) or bytes (binary); None once the connection is over."""
        try:
            while True:
                event = self._next_event()
                if type(event) is str or type(event) is bytes:
                    return event
                if type(event) is PongDue:
                    self.outbox.send(event.frame)
                elif type(event) is Close:
                    self._answer_close(event)
                    return None
                elif type(event) is Violation:
                    self.refused_midway = event.payload_unread
                    self.close(event.code, event.reason)
                    return None
        except (ConnectionLost, OSError):
            self.closed = True
            self.outbox.closed = True
        return None

    def drain(self, limit=1 << 20):
        """Drop what the client still sends after a refusal, for at most CLOSE_LINGER seconds
        and `limit` bytes: closing with unread input resets the connection, and the reset can
        destroy our close frame (1009) before the client reads it."""
        with gevent.Timeout(CLOSE_LINGER, False):
            try:
                while limit > 0:
                    data = self._ahead or self._recv(min(limit, 65536))
                    self._ahead = b""
                    if not data:
                        return
                    limit -= len(data)
            except OSError:
                pass

    def _answer_close(self, close):
        self.close_code = close.code
        if self.outbox.close_info is None:
            self.outbox.close_info = (close.code, close.reason, "client")
        if not self.closed:
            self.closed = True
            self.outbox.send(close_frame(close.reply_code))
            self.outbox.closed = True

    # ---------------------------------------------------------------- writing

    def send_bytes(self, payload):
        """Send one text message whose UTF-8 payload is already encoded."""
        self.outbox.send(build_frame(payload))

    def send(self, message, binary=None):
        payload = message.encode() if isinstance(message, str) else bytes(message)
        self.outbox.send(build_frame(payload, OP_BINARY if binary else OP_TEXT))

    def close(self, code=WsClose.NORMAL, message=""):
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        self.closed = True
        self.outbox.close(int(code), message or "")


def session_over(ws):
    """After a connection's session, whoever upgraded its socket: no more writes, and a client
    refused in the middle of a frame is drained (after the connection's cleanup, not before)."""
    ws.outbox.closed = True
    if ws.refused_midway:
        ws.drain()


WEBSOCKET_VERSIONS = WebSocketHandler.SUPPORTED_VERSIONS
WEBSOCKET_GUID = WebSocketHandler.GUID


def handshake_refusal(environ):
    """Why a WebSocket upgrade request cannot be answered with 101, as (status, headers, body),
    or None when it can."""
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") not in WEBSOCKET_VERSIONS:
        return ("400 Bad Request", [("Sec-WebSocket-Version", ", ".join(WEBSOCKET_VERSIONS))],
                b"Unsupported WebSocket version")
    try:
        key = base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 16:
        return "400 Bad Request", [], b"Invalid Sec-WebSocket-Key"
    return None


def handshake_headers(environ):
    """The headers of the 101 answering a valid upgrade request."""
    key = environ["HTTP_SEC_WEBSOCKET_KEY"].strip()
    accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode("latin-1")).digest())
    return [("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept.decode("latin-1"))]


class PusherWebSocketHandler(WebSocketHandler):
    """gevent-websocket's handler with our WebSocket and no per-address client table."""

    def handle(self):
        # pywsgi sends a response's headers and body in two writes: with Nagle on, the body
        # waits for the client's delayed ACK on every keep-alive HTTP API request.
        if self.socket.family != socket.AF_UNIX:
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        super().handle()

    def MessageClass(self, fp, *args):
        return RequestHeaders.read(fp)

    def get_environ(self):
        environ = super().get_environ()
        environ["RAW_URI"] = self.path  # as gunicorn does: the path before percent-decoding
        environ[SESSION_KEY] = None     # says this handler runs a session the app leaves
        return environ

    def upgrade_connection(self):
        refusal = handshake_refusal(self.environ)
        if refusal is not None:
            status, headers, body = refusal
            self.start_response(status, headers)
            return [body]
        self.websocket = PusherWebSocket(self.socket, _buffered_ahead(self))
        self.environ["wsgi.websocket_version"] = self.environ["HTTP_SEC_WEBSOCKET_VERSION"]
        self.environ["wsgi.websocket"] = self.websocket
        self.start_response("101 Switching Protocols", handshake_headers(self.environ))
        return None

    def run_websocket(self):
        try:
            list(self.application(self.environ, lambda status, headers, exc_info=None: []))
            session = self.environ.get(SESSION_KEY)
            if session is not None:
                # The socket's long life, after the application returned. pywsgi would keep
                # the request's environ, headers and request line and the handshake's
                # response headers for all of it: freed first (the access log skips
                # upgrades, so nothing reads them again).
                self.environ = {"wsgi.websocket": self.websocket}
                self.headers = self.websocket.environ = self.response_headers = None
                self.requestline = self.path = ""
                session()
        finally:
            session_over(self.websocket)
            self.environ["wsgi.websocket"] = None
            self.websocket = None

    def log_request(self):
        pass  # the access log is BunPulse's own (--access-log): no query string, no signature
