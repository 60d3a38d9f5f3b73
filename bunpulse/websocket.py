"""An upgraded WebSocket read by the event loop (`PusherWebSocket`), and `serve_upgraded`, the
one way every driver serves a connection once its handshake is answered.

It fixes what gevent-websocket 0.10.1 gets wrong for a Pusher server: close frames carry a
real code, an oversized message is refused from its header (1009) before its payload is read,
invalid UTF-8 closes with 1007 and protocol errors with 1002 (frames.py parses, without I/O).
After the handshake no greenlet waits on a socket: the event loop reads it when it is readable
and the outbox writes what did not fit when it is writable, so an idle connection costs a few
small objects.
"""
import logging
import _socket

import gevent
import gevent.event
from gevent import get_hub

from .devapp import REFUSED
from .request import query_params, request_path
from .errors import ConnectionRefused, ErrorCode, WsClose
from .frames import OP_BINARY, OP_TEXT, Close, FrameParser, PongDue, build_frame, close_frame
from .outbox import Outbox, TlsSocket

log = logging.getLogger("bunpulse.transport")

READ_SIZE = 16384   # bytes read per readiness: bounds the work one client causes at a time
DISCARD_LIMIT = 1 << 20  # bytes of a refused frame dropped so that the close frame arrives
_EV_READ = 1


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


def serve_upgraded(context, ws, environ):
    """Run one Pusher connection on `ws`, a PusherWebSocket whose handshake is answered (or
    queued in its outbox), for the request in `environ` (its path, query and client address);
    returns at once. Every driver ends here: the same admission, per-address limit, limits
    and heartbeat whichever server accepted the socket."""
    core = context.core
    try:
        admission = ConnectionRefused(ErrorCode.UNAUTHORIZED, REFUSED) \
            if core.dev_app.refuses(environ) else \
            core.admit(request_path(environ), query_params(environ),
                       environ.get("HTTP_ORIGIN"))
        core.serve_websocket(ws, admission, core.address_of(environ))
    finally:
        not_served(ws)


def not_served(ws):
    """A socket nobody took (an error, or a host application that routed the upgrade
    elsewhere) is closed with 1001 rather than left open."""
    if not ws.started:
        ws.close(WsClose.GOING_AWAY, "Not served")
        ws.start(None)


def detach_socket(sock):
    """The raw non-blocking socket under gevent's wrapper, which lets go of it (and of its
    two watchers): the server would close it when the request ends. A TLS socket stays whole
    (its TLS state lives in it), read and written through `TlsSocket`."""
    if getattr(sock, "_sslobj", None) is not None:
        return TlsSocket(sock)
    raw = _socket.socket(fileno=sock.detach())
    raw.setblocking(False)
    return raw
