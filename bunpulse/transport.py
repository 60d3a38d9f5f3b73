"""The WebSocket transport: socket I/O only, and the only module that imports geventwebsocket.

It fixes what gevent-websocket 0.10.1 gets wrong for a Pusher server:
close frames carry a real code, an oversized message is refused from its header (1009) before
its payload is read, invalid UTF-8 closes with 1007 and protocol errors with 1002 (frames.py
parses, without I/O), and no per-address client table (which breaks on unix sockets).

After the handshake no greenlet waits on a socket: the event loop reads it when it is readable
(PusherWebSocket) and writes what did not fit when it is writable (Outbox), so an idle
connection costs a few small objects. The seam: `PusherWebSocket(raw, ahead)` runs on any
upgraded raw socket plus the bytes already read past the handshake: BunPulse's own handler's,
gevent-websocket's stock handler's (stock.py) and flask run's, in its hub thread (threaded.py).
"""
import base64
import hashlib
import io
import logging
import re
import _socket
import socket
import ssl
import time
from wsgiref.handlers import format_date_time
from urllib.parse import unquote

import gevent
import gevent.event
from gevent import get_hub, getcurrent
from gevent.hub import Hub
import httptools
from geventwebsocket.handler import WebSocketHandler

from .errors import ErrorCode, WsClose
from .frames import (OP_BINARY, OP_TEXT, Close, FrameParser, PongDue, build_frame,
                     close_frame, deflated)
from .request_headers import MAX_HEAD, TOO_LARGE, RequestHeaders

log = logging.getLogger("bunpulse.transport")
client_log = logging.getLogger("bunpulse.clients")  # clients' mistakes, at info

CLOSE_LINGER = 3.0  # seconds to wait for the client's close frame before dropping the socket
READ_SIZE = 16384   # bytes read per readiness: bounds the work one client causes at a time
DISCARD_LIMIT = 1 << 20  # bytes of a refused frame dropped so that the close frame arrives
HANDSHAKE_TIMEOUT = 10.0  # seconds a request head may take to arrive (--handshake-timeout)
KEEPALIVE_TIMEOUT = 5.0   # seconds an idle keep-alive connection is kept (--keepalive-timeout)
_EV_READ, _EV_WRITE = 1, 2


class _ClientMistakes(logging.LoggerAdapter):
    """gevent-websocket warns about a client's bad upgrade request: a client's mistake, so
    at info."""

    def warning(self, msg, *args, **kwargs):
        self.info(msg, *args, **kwargs)


class Outbox:
    """The single writer of one socket.

    `send` from a greenlet tries a non-blocking write at once; what the event loop itself sends
    in one turn leaves in one write when the turn ends (the events of every publish served in
    that turn: one syscall per socket, not one per event). What does not fit is written by a
    write watcher of the event loop when the socket drains (no greenlet), coalesced into one
    write. Past `limit` bytes that the socket would not take the peer is evicted (close 4100,
    so pusher-js backs off and reconnects). While corked, sends only queue: the frames
    answered to one read leave in one write."""

    __slots__ = ("_raw", "_pending", "_pending_size", "_watcher", "_corked", "limit",
                 "closed", "close_code", "close_info", "_closing", "_release", "on_evict",
                 "on_released", "deflate", "__weakref__")

    def __init__(self, sock, limit, on_evict=None, head=None):
        self._raw = getattr(sock, "_sock", sock)  # the non-blocking socket under gevent's
        self._pending = [head] if head else []
        self._pending_size = len(head) if head else 0
        self._watcher = None
        self._corked = bool(head)
        self.limit = limit
        self.closed = False
        self.close_code = None  # the code of the close frame this side sent first
        self.close_info = None  # (code, reason, who closed: "server", "client" or "evicted")
        self._closing = False
        self._release = False
        self.on_evict = on_evict
        self.on_released = None  # called once the socket is closed after `release`
        self.deflate = False  # permessage-deflate: messages leave deflated (frames.deflated)

    @property
    def backlog(self):
        return self._pending_size

    def send(self, frame):
        if self.closed:
            return
        if self.deflate:
            frame = deflated(frame)
        if self._pending or self._corked:
            self._pending.append(frame)
            self._pending_size += len(frame)
            if self._pending_size > self.limit:
                if self._watcher is None and not self._corked:
                    self._flush()  # nothing was tried yet this turn: what fits leaves now
                if self._pending_size > self.limit:
                    self._evict()
            return
        if type(getcurrent()) is Hub:
            # Sent by the event loop itself (a publish or a subscription served in its
            # callback): written once this turn of the loop is done, with whatever else the
            # turn sends this socket (the events of every publish it serves): one write.
            self._pending.append(frame)
            self._pending_size = len(frame)
            get_hub().loop.run_callback(self._flush_queued)
            return
        try:  # from a greenlet (a big fan-out, Redis, a hook): at once
            sent = self._raw.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop()
            return
        if sent < len(frame):
            self._pending.append(frame[sent:])
            self._pending_size = len(frame) - sent
            self._watch()

    def _flush_queued(self):
        if self._pending and self._watcher is None and not self._corked:
            self._flush()

    def cork(self):
        self._corked = True

    def uncork(self):
        self._corked = False
        if self._pending and self._watcher is None:
            self._flush()

    def _watch(self):
        if self._watcher is None:
            self._watcher = get_hub().loop.io(self._raw.fileno(), _EV_WRITE)
            self._watcher.start(self._flush)

    def _flush(self):
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop()
            return
        pending.clear()
        if sent < len(data):
            pending.append(data[sent:])
            self._pending_size = len(data) - sent
            self._watch()
            return
        self._pending_size = 0
        self._unwatch()
        if self._release:
            self._close_raw()
        elif self._closing:
            self._half_close()

    def _unwatch(self):
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None

    def _evict(self):
        log.info("evicting a client that stopped reading (%d bytes queued)", self._pending_size)
        self._drop()
        self.close_code = ErrorCode.OVER_CAPACITY
        self.close_info = (ErrorCode.OVER_CAPACITY, "Client too slow", "evicted")
        try:  # best effort: the socket buffer is probably full
            self._raw.send(close_frame(ErrorCode.OVER_CAPACITY, "Client too slow"))
        except OSError:
            pass
        self.shutdown()
        if self.on_evict is not None:
            self.on_evict()

    def _drop(self):
        self.closed = True
        self._pending.clear()
        self._pending_size = 0
        self._unwatch()
        if self._release:
            self._close_raw()

    def _close_raw(self):
        self._raw.close()
        on_released, self.on_released = self.on_released, None
        if on_released is not None:
            on_released()

    def release(self):
        """The reader is done with the socket: close it once what is queued is written."""
        self.closed = self._release = True
        if not self._pending or self._raw.fileno() < 0:
            self._drop()
        elif not self._closing:  # a close frame's timer already bounds the wait
            get_hub().loop.timer(CLOSE_LINGER).start(self.shutdown)

    def close(self, code, reason=""):
        """Queue a close frame after what is pending, then half-close; the linger timer drops
        the socket if the client never answers."""
        if self.closed:
            return
        self.send(close_frame(code, reason))
        self.closed = True
        self.close_code = code
        self.close_info = (code, reason, "server")
        self._closing = True
        if not self._pending:
            self._half_close()
        get_hub().loop.timer(CLOSE_LINGER).start(self.shutdown)

    def _half_close(self):
        if isinstance(self._raw, _TlsSocket):
            return  # shutdown() would drop TLS for the reads still to come (the client's close)
        try:
            self._raw.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def shutdown(self):
        """Drop the connection now: the reader sees EOF and cleans up."""
        release, self._release = self._release, False
        self._drop()
        if release:
            self._close_raw()
            return
        try:
            self._raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Ignore:
    """The consumer of a socket nobody serves: it waits for the client's close frame."""

    @staticmethod
    def take(message):
        return None

    @staticmethod
    def ping_frame():
        pass

    @staticmethod
    def ended():
        pass


class PusherWebSocket:
    """An upgraded socket read by the event loop: no greenlet waits on an idle one.

    A readiness callback makes one bounded read (so a flooding client gets its turn like the
    others and never holds the worker), feeds the frame parser, answers control frames, and
    hands each message to the consumer's `take`, which handles it at once or returns work
    that may block (Redis, hooks, a fan-out that yields). That work runs in a short-lived
    greenlet, with the socket's reading paused so that its messages keep their order."""

    __slots__ = ("_raw", "_watcher", "_parser", "outbox", "closed", "close_code", "_consumer",
                 "started", "_discard", "_ahead", "__weakref__")

    def __init__(self, raw, ahead=b"", head=None, deflate=False):
        """`raw`: the upgraded non-blocking socket; `ahead`: the bytes already read past the
        handshake; `head`: the handshake's answer, sent with the first frames; `deflate`:
        permessage-deflate was negotiated."""
        self._raw = raw
        self._watcher = None
        self._parser = FrameParser(inflate=deflate)
        self._ahead = ahead  # parsed once the core has set the limits
        self.outbox = Outbox(raw, 1 << 20, head=head)  # the core sets its limit (max_buffer)
        self.outbox.deflate = deflate
        self.closed = False      # a close frame was sent or received: messages are ignored
        self.close_code = None   # the code of the client's close frame
        self._consumer = None
        self.started = False
        self._discard = -1       # >= 0: refused midway, bytes still dropped before closing

    @property
    def max_message_size(self):
        return self._parser.max_message_size

    @max_message_size.setter
    def max_message_size(self, size):
        self._parser.max_message_size = size

    # ---------------------------------------------------------------- reading

    def start(self, consumer):
        """Serve the socket from the event loop and return at once.

        `consumer.take(message)` gets every message (str or bytes), in the event loop: it
        returns None when done, or work for `consumer.run(work)` in a greenlet;
        `consumer.ping_frame()` hears of each ping frame, which the transport answers;
        `consumer.ended()` is called once, when the connection is over. The handshake's
        answer and what was sent before this call leave now, in one write."""
        self.started = True
        self._consumer = consumer if consumer is not None else _Ignore
        self._watcher = get_hub().loop.io(self._raw.fileno(), _EV_READ)
        self._resume()
        self._parser.receive_data(self._ahead)  # frames that came with the handshake
        self._ahead = None
        events = self._parser.events_received()
        if events:
            self._events(events)
        else:
            self.outbox.uncork()

    def _resume(self):
        self._watcher.start(self._readable)
        pending = getattr(self._raw, "pending", None)
        if pending is not None and pending():
            get_hub().loop.run_callback(self._readable)  # TLS holds more: no readiness will say

    def _readable(self):
        if self._watcher is None or not self._watcher.active:
            return  # ended, or paused for a message's work, since this read was scheduled
        try:
            data = self._raw.recv(max(self._parser.missing, READ_SIZE))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            if not data:
                self._end()
            elif self._discard >= 0:
                self._discard -= len(data)
                if self._discard < 0:
                    self._end()
            else:
                self._parser.receive_data(data)
                events = self._parser.events_received()
                if events:
                    self._events(events)
                pending = getattr(self._raw, "pending", None)
                if pending is not None and pending():
                    get_hub().loop.run_callback(self._readable)  # TLS holds more: read on
        except Exception:  # noqa: BLE001 - one socket's error must never reach the event loop
            log.exception("error serving a WebSocket")
            self.outbox.shutdown()
            self._end()

    def _events(self, events):
        """Handle events in the event loop until one needs a greenlet."""
        outbox = self.outbox
        outbox.cork()  # what this read makes us answer leaves in one write
        try:
            for index, event in enumerate(events):
                kind = type(event)
                if kind is str or kind is bytes:
                    if self.closed:
                        continue  # closing: wait for the client's close frame
                    work = self._consumer.take(event)
                    if work is not None:
                        self._watcher.stop()
                        gevent.spawn_raw(self._work, work, events[index + 1:])
                        return
                elif not self._control(event):
                    return
        finally:
            outbox.uncork()

    def _work(self, work, rest):
        consumer = self._consumer
        try:
            consumer.run(work)
            for event in rest:
                kind = type(event)
                if kind is str or kind is bytes:
                    if not self.closed:
                        work = consumer.take(event)
                        if work is not None:
                            consumer.run(work)
                elif not self._control(event):
                    return
        except Exception:  # noqa: BLE001 - logged; the connection goes on
            log.exception("error handling a WebSocket message")
        if self._watcher is not None:
            self._resume()

    def _control(self, event):
        """Answer a ping, a close or a violation; False once reading is over."""
        kind = type(event)
        if kind is PongDue:
            if self._consumer is not None:
                self._consumer.ping_frame()  # counted like a message (the rate limit)
            self.outbox.send(event.frame)
            return True
        if kind is Close:
            self.close_code = event.code
            if self.outbox.close_info is None:
                self.outbox.close_info = (event.code, event.reason, "client")
            if not self.closed:
                self.closed = True
                self.outbox.send(close_frame(event.reply_code))
            self._end()
            return False
        # A violation: close with its code. A frame refused before its payload arrived is
        # still coming: up to DISCARD_LIMIT bytes of it are dropped (or until the linger
        # timer ends the socket), since closing with unread input resets the connection, and
        # the reset can destroy the close frame (1009) before the client reads it.
        self.close(event.code, event.reason)
        if event.payload_unread:
            self._discard = DISCARD_LIMIT
            self._ended()  # the connection's cleanup first, then the draining
            if self._watcher is not None and not self._watcher.active:
                self._resume()  # paused by a message's work
        else:
            self._end()
        return False

    def _ended(self):
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            self.closed = True
            try:
                consumer.ended()
            except Exception:  # noqa: BLE001
                log.exception("error ending a WebSocket connection")

    def _end(self):
        """The connection is over: stop reading, tell the consumer, and close the socket once
        what is queued for it is written (or the linger timer gives up)."""
        self.closed = True
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
        self._ended()
        self.outbox.release()

    def wait(self):
        """Block the calling greenlet until the connection is over and its socket closed: for
        a server whose handler must not return before then (gevent-websocket's stock handler:
        gunicorn's stock worker exits once its handlers have returned)."""
        if self._raw.fileno() < 0:
            return
        over = gevent.event.Event()
        self.outbox.on_released = over.set
        over.wait()

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


class _HeadTooLarge(ValueError):
    pass


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: ")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _switching(accept, deflate):
    """The handshake's answer."""
    return b"".join((_SWITCHING, accept, _DEFLATE_ANSWER if deflate else b"", b"\r\n\r\n"))


# Without context takeover on either side, one compression of an event serves every socket,
# and no socket keeps a compressor's or decompressor's window.
_DEFLATE_ANSWER = (b"\r\nSec-WebSocket-Extensions: permessage-deflate; "
                   b"server_no_context_takeover; client_no_context_takeover")


def _deflate_offered(offers):
    """Whether the client's Sec-WebSocket-Extensions offers a permessage-deflate we can take:
    any offer whose parameters allow a server window of 15 bits (compressed once per event,
    the same bytes for every socket)."""
    for offer in offers.split(","):
        name, *params = [part.strip() for part in offer.split(";")]
        if name != "permessage-deflate":
            continue
        for param in params:
            key, _, value = param.partition("=")
            key, value = key.strip(), value.strip().strip('"')
            if key in ("server_no_context_takeover", "client_no_context_takeover"):
                continue
            if key == "client_max_window_bits" and (not value or value in _WINDOW_BITS):
                continue
            if key == "server_max_window_bits" and value == "15":
                continue
            break
        else:
            return True
    return False


_WINDOW_BITS = {str(bits) for bits in range(8, 16)}


def _first_head(sock, data=b""):
    """The bytes of a request head (and whatever came behind it), read until its end or
    MAX_HEAD bytes; b"" if the client closed first."""
    data = data or sock.recv(FIRST_READ)
    if not data or _HEAD_END.search(data):
        return data
    # A head in many pieces: gathered in a bytearray and searched only where new bytes came,
    # so that a client sending a byte at a time costs linear work, not quadratic.
    buffer = bytearray(data)
    while len(buffer) <= MAX_HEAD:
        searched = max(0, len(buffer) - 3)
        more = sock.recv(MAX_HEAD)
        if not more:
            return b""
        buffer += more
        if _HEAD_END.search(buffer, searched):
            break
    return bytes(buffer)


FIRST_READ = 16384  # bytes asked of a new connection at first: a head is usually far smaller
MAX_FAST_BODY = 1 << 20  # larger bodies go through pywsgi (and the application's own limit)
_date = [0, ""]


def _http_date():
    """The Date header's value, formatted once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[:] = now, format_date_time(now)
    return _date[1]


class _Request:
    """httptools' callbacks: a request's target and headers; for a publish request, where its
    head and body end and whether the connection is kept."""

    __slots__ = ("url", "headers", "head_end", "body_end", "keep_alive")

    def __init__(self):
        self.url = b""
        self.headers = {}

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        name = name.lower()
        known = self.headers.get(name)
        self.headers[name] = value if known is None else known + b"," + value  # as pywsgi

    def environ(self, method, remote):
        """The WSGI environ of the request, as far as the application reads it."""
        target = self.url.decode("latin-1")
        path, _, query = target.partition("?")
        environ = {"REQUEST_METHOD": method, "PATH_INFO": unquote(path, "latin-1"),
                   "QUERY_STRING": query, "RAW_URI": target, "SERVER_PROTOCOL": "HTTP/1.1",
                   "REMOTE_ADDR": remote}
        for name, value in self.headers.items():
            key = _ENVIRON_KEYS.get(name)
            if key is None:
                key = name.decode("latin-1").upper().replace("-", "_")
                if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                    key = "HTTP_" + key
            environ[key] = value.decode("latin-1")
        return environ


# The environ keys of the headers every publish and upgrade carries.
_ENVIRON_KEYS = {name.encode(): ("" if name.startswith("content-") else "HTTP_")
                 + name.upper().replace("-", "_")
                 for name in ("host", "content-type", "content-length", "connection", "upgrade",
                              "user-agent", "accept", "accept-encoding", "origin",
                              "sec-websocket-key", "sec-websocket-version",
                              "sec-websocket-extensions", "x-pusher-library")}


# ------------------------------------------------------------ requests served at once

def set_nodelay(sock):
    # A response's headers and body may leave in two writes (pywsgi): with Nagle on, the body
    # would wait for the client's delayed ACK on every keep-alive HTTP API request.
    if sock.family != socket.AF_UNIX:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def upgrade_at_once(app, data, take_socket, address):
    """Serve a well-formed WebSocket upgrade in `data` (a whole request head, perhaps with
    frames behind it) without pywsgi's machinery (its request objects, its full environ):
    `take_socket()` gives the upgraded raw socket. False for any other request, and for an
    upgrade refused in HTTP, whose answer pywsgi writes as before. The application gets the
    socket in an environ that holds only what serving it needs."""
    if not data.startswith(b"GET "):
        return False
    head = _Request()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data)
        return False  # not an upgrade
    except httptools.HttpParserUpgrade as upgrade:
        ahead = data[upgrade.args[0]:]
    except httptools.HttpParserError:
        return False
    headers = head.headers
    key = headers.get(b"sec-websocket-key", b"").strip()
    if (parser.get_http_version() != "1.1" or headers.get(b"upgrade", b"").lower() != b"websocket"
            or b"upgrade" not in headers.get(b"connection", b"").lower()
            or headers.get(b"sec-websocket-version") not in (b"13", b"8", b"7")
            or len(key) != 24 or not _valid_key(key)):
        return False
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    offers = headers.get(b"sec-websocket-extensions")
    deflate = offers is not None and getattr(app, "compression", False) and _deflate_offered(
        offers.decode("latin-1"))
    ws = PusherWebSocket(take_socket(), ahead, _switching(accept, deflate), deflate)
    environ = head.environ("GET", _remote(address))
    environ["wsgi.websocket"] = ws
    try:
        app(environ, _ignore_response)
    finally:
        if not ws.started:
            ws.close(WsClose.GOING_AWAY, "Not served")
            ws.start(None)
    return True


def publish_request(app, data):
    """The head of a request in `data` that may be a publish call the application answers at
    once (`fast_answer`), or None for any other request (pywsgi's then, with all that was
    read): HTTP/1.1 POST, whole head, a body of known and modest length."""
    if not data.startswith(b"POST ") or getattr(app, "fast_answer", None) is None:
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    request = _Request()
    parser = httptools.HttpRequestParser(request)
    try:
        parser.feed_data(data[:end + 4])
    except httptools.HttpParserError:
        return None
    headers = request.headers
    length = headers.get(b"content-length", b"")
    if (parser.get_http_version() != "1.1" or not length.isdigit()
            or int(length) > MAX_FAST_BODY or b"transfer-encoding" in headers
            or b"expect" in headers):
        return None
    request.head_end = end + 4
    request.body_end = end + 4 + int(length)
    request.keep_alive = parser.should_keep_alive()
    return request


def answer_publish(app, request, data, address):
    """The whole HTTP answer to a publish request whose body `data` holds, or None when the
    application does not answer it at once (not a publish call: pywsgi's then)."""
    environ = request.environ("POST", _remote(address))
    environ["wsgi.input"] = io.BytesIO(data[request.head_end:request.body_end])
    response = []
    body = app.fast_answer(environ, lambda status, headers, exc_info=None: response.extend(
        (status, headers)))
    if body is None:
        return None
    status, headers = response
    return b"".join([b"HTTP/1.1 %s\r\n" % status.encode("latin-1"),
                     *(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
                       for k, v in headers),
                     b"Date: %s\r\n\r\n" % _http_date().encode(), *body])


def _read_body(sock, data, end):
    """`data` read on until it holds `end` bytes (a request's body, as pywsgi would wait for
    it), or until the client stops sending."""
    while len(data) < end:
        more = sock.recv(max(end - len(data), 65536))
        if not more:
            break
        data += more
    return data


def _remote(address):
    """REMOTE_ADDR as pywsgi gives it: the peer's host, or "" on a unix socket."""
    return address[0] if isinstance(address, tuple) and address else ""


def _ignore_response(status, headers, exc_info=None):
    return None


def _valid_key(key):
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def detach_socket(sock):
    """The raw non-blocking socket under gevent's wrapper, which lets go of it (and of its
    two watchers): pywsgi would close it when the request ends. A TLS socket stays whole (its
    TLS state lives in it), read and written through `_TlsSocket`."""
    if getattr(sock, "_sslobj", None) is not None:
        return _TlsSocket(sock)
    raw = _socket.socket(fileno=sock.detach())
    raw.setblocking(False)
    return raw


class _TlsSocket:
    """A TLS socket as the event loop's reader and writer use a raw one: calls that never
    wait (BlockingIOError when TLS would), on the non-blocking socket under gevent's."""

    __slots__ = ("_sock", "_tls")

    def __init__(self, sock):
        self._sock = sock
        self._tls = sock._sslobj
        # The server closes the socket when the request's handler returns; an open reference
        # (as a makefile() holds) makes that close wait until `close` below.
        sock._io_refs += 1

    def fileno(self):
        return self._sock.fileno()

    def pending(self):
        """Bytes TLS has decrypted and not handed out: no readiness will announce them."""
        return self._tls.pending() if self._sock.fileno() >= 0 else 0

    def recv(self, size):
        try:
            return self._tls.read(size)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError() from None
        except ssl.SSLError:
            return b""  # a broken TLS stream ends the connection

    def send(self, data):
        # A record that does not fit now is written again from its start later, as OpenSSL
        # requires: the outbox's next write begins with the same bytes.
        try:
            return self._tls.write(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            raise BlockingIOError() from None

    def shutdown(self, how):
        self._sock._sock.shutdown(how)

    def close(self):
        sock = self._sock
        if sock._io_refs > 0:
            sock._io_refs -= 1
        sock.close()


class _Prefixed(io.RawIOBase):
    """A socket read as a file, starting with bytes already read from it."""

    def __init__(self, data, sock):
        self._data = data
        self._sock = sock

    def readable(self):
        return True

    def readinto(self, buffer):
        if self._data:
            n = min(len(buffer), len(self._data))
            buffer[:n] = self._data[:n]
            self._data = self._data[n:]
            return n
        return self._sock.recv_into(buffer)


def _answer(status, message):
    body = b'{"error":"%s"}' % message.encode()
    return (b"HTTP/1.1 %s\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status.encode(), len(body), body))


_HEAD_TOO_LARGE = _answer("431 Request Header Fields Too Large", TOO_LARGE)
_BAD_REQUEST = _answer("400 Bad Request", "Malformed request")


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
    """gevent-websocket's handler with our WebSocket, no per-address client table, and time
    and size limits on request heads."""

    _served = False  # a request was served on this connection: the next one is keep-alive
    logger = _ClientMistakes(client_log, {})  # gevent-websocket's upgrade warnings

    def __init__(self, sock, address, server, rfile=None):
        # pywsgi makes a buffered reader here; an upgrade read by `handle` never needs one.
        self.socket, self.client_address, self.server, self.rfile = sock, address, server, rfile

    ahead = b""    # bytes of the first request already read (by the event loop: reception.py)
    unsent = b""   # an answer's end that the event loop could not write at once

    def handle(self):
        sock = self.socket
        set_nodelay(sock)
        if self.unsent:
            try:
                sock.sendall(self.unsent)
            except OSError:
                return
        app = self.server.application
        data = self.ahead
        if not data or not _HEAD_END.search(data):
            timer = gevent.Timeout.start_new(getattr(app, "handshake_timeout",
                                                     HANDSHAKE_TIMEOUT))
            try:
                data = _first_head(sock, data)
            except gevent.Timeout as exc:
                if exc is not timer:
                    raise
                return  # silent or too slow: closed
            except OSError:
                return
            finally:
                timer.cancel()
        while data:
            if upgrade_at_once(app, data, self._detach, self.client_address):
                return
            request = publish_request(app, data)
            if request is None:
                break
            try:
                data = _read_body(sock, data, request.body_end)
            except OSError:
                return
            if len(data) < request.body_end:
                break  # the client stopped short: pywsgi answers (400)
            response = answer_publish(app, request, data, self.client_address)
            if response is None:
                break
            try:
                sock.sendall(response)
            except OSError:
                return
            if not request.keep_alive:
                return
            data = self._next_head(app, data[request.body_end:])
        if not data:
            return
        # Anything else goes through pywsgi, as it would have, starting with what was read.
        self.rfile = io.BufferedReader(_Prefixed(data, sock))
        super().handle()

    def _detach(self):
        return detach_socket(self.socket)

    def _next_head(self, app, data):
        """A keep-alive connection's next request head (after what was already read), or b""
        once the client is gone or idle past the keep-alive timeout."""
        if _HEAD_END.search(data) or len(data) > MAX_HEAD:
            return data
        timer = gevent.Timeout.start_new(getattr(app, "keepalive_timeout", KEEPALIVE_TIMEOUT))
        try:
            return _first_head(self.socket, data)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            return b""
        except OSError:
            return b""
        finally:
            timer.cancel()

    def handle_one_request(self):
        # A request head must arrive in time, or the connection is closed: the first within
        # the handshake timeout of the accept, a later one (keep-alive) within the keep-alive
        # timeout of the last answer. Slow or silent clients then cannot hold sockets.
        app = self.server.application
        timer = self._head_timer = gevent.Timeout.start_new(
            getattr(app, "keepalive_timeout", KEEPALIVE_TIMEOUT) if self._served else
            getattr(app, "handshake_timeout", HANDSHAKE_TIMEOUT))
        try:
            return super().handle_one_request()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            return None
        finally:
            timer.cancel()
            self._served = True

    def read_request(self, raw_requestline):
        try:
            return super().read_request(raw_requestline)
        finally:
            self._head_timer.cancel()  # the head is in: the application has its own limits

    def MessageClass(self, fp, *args):
        headers = RequestHeaders.read(fp, MAX_HEAD - len(self.requestline) - 2)
        if headers.status == TOO_LARGE:
            raise _HeadTooLarge(TOO_LARGE)
        return headers

    def _handle_client_error(self, ex):
        # A client's mistake (pywsgi answers it): said at info level, without pywsgi's socket
        # repr.
        client_log.info("bad request from %s: %s", self.client_address or "a unix socket",
                 str(ex)[:200])
        if isinstance(ex, _HeadTooLarge):
            return "431", _HEAD_TOO_LARGE
        return "400", _BAD_REQUEST

    def get_environ(self):
        environ = super().get_environ()
        environ["RAW_URI"] = self.path  # as gunicorn does: the path before percent-decoding
        return environ

    def upgrade_connection(self):
        refusal = handshake_refusal(self.environ)
        if refusal is not None:
            status, headers, body = refusal
            self.start_response(status, headers)
            return [body]
        key = self.environ["HTTP_SEC_WEBSOCKET_KEY"].strip()
        accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode("latin-1")).digest())
        # The answer waits in the outbox, corked: it leaves with the first frames the
        # application sends (connection_established), in one write.
        ahead = _buffered_ahead(self)
        deflate = getattr(self.server.application, "compression", False) and _deflate_offered(
            self.environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS", ""))
        self.websocket = PusherWebSocket(detach_socket(self.socket), ahead,
                                         _switching(accept, deflate), deflate)
        self.environ.update({"wsgi.websocket_version": self.environ["HTTP_SEC_WEBSOCKET_VERSION"],
                             "wsgi.websocket": self.websocket})
        self.status = "101 Switching Protocols"
        self.headers_sent = True
        self.close_connection = True
        return None

    def run_websocket(self):
        ws = self.websocket
        try:
            # The application starts the socket (ws.start) and returns: the event loop reads
            # it from then on, and this greenlet ends.
            list(self.application(self.environ, lambda status, headers, exc_info=None: []))
        finally:
            if not ws.started:
                ws.close(WsClose.GOING_AWAY, "Not served")
                ws.start(None)
            self.environ["wsgi.websocket"] = None
            self.websocket = None

    def log_request(self):
        pass  # the access log is BunPulse's own (--access-log): no query string, no signature
