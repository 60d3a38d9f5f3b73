"""The single writer of one socket (`Outbox`), and a TLS socket written and read as a raw
non-blocking one (`TlsSocket`).

No greenlet waits to write: what the socket does not take at once is written by a write
watcher of the event loop when it drains, coalesced into one write; past `limit` bytes that
the socket would not take, the peer is evicted (close 4100).
"""
import logging
import socket
import ssl
from bisect import bisect_right
from itertools import accumulate

from gevent import get_hub, getcurrent
from gevent.hub import Hub

from .errors import ErrorCode
from .frames import close_frame, deflated

log = logging.getLogger("bunpulse.transport")

CLOSE_LINGER = 3.0  # seconds to wait for the client's close frame before dropping the socket
_EV_WRITE = 2


def in_the_loop():
    """Whether the caller is the event loop itself (a callback), not a greenlet: there
    nothing may wait, and what is sent is written when the loop's turn ends."""
    return type(getcurrent()) is Hub


class Outbox:
    """The single writer of one socket.

    `send` from a greenlet tries a non-blocking write at once; what the event loop itself sends
    in one turn leaves in one write when the turn ends (the events of every publish served in
    that turn: one syscall per socket, not one per event). What does not fit is written by a
    write watcher of the event loop when the socket drains (no greenlet), coalesced into one
    write. Past `limit` bytes that the socket would not take the peer is evicted (close 4100,
    so pusher-js backs off and reconnects). While corked, sends only queue: the frames
    answered to one read leave in one write."""

    __slots__ = ("_raw", "_pending", "_pending_size", "_partial", "_watcher", "_corked",
                 "limit", "closed", "close_code", "close_info", "_closing", "_release",
                 "on_evict", "on_released", "deflate", "__weakref__")

    def __init__(self, sock, limit, on_evict=None, head=None):
        self._raw = getattr(sock, "_sock", sock)  # the non-blocking socket under gevent's
        self._pending = [head] if head else []
        self._pending_size = len(head) if head else 0
        # The frames waiting, whole, except the first when `_partial`: the end of a frame
        # the socket took the start of (an eviction must finish it before its close frame).
        self._partial = False
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
        if type(getcurrent()) is Hub:  # in_the_loop(), inline: once per delivery
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
            self._partial = sent > 0
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
        if sent < len(data):
            if len(pending) == 1:
                pending[0] = data[sent:]
                self._partial = self._partial or sent > 0
            else:  # frames kept whole: the one `sent` ends in, and those after it
                ends = list(accumulate(map(len, pending)))
                at = bisect_right(ends, sent)
                into = sent - (ends[at - 1] if at else 0)
                self._partial = into > 0 or (at == 0 and self._partial)
                pending[:at + 1] = [pending[at][into:]]
            self._pending_size = len(data) - sent
            self._watch()
            return
        pending.clear()
        self._partial = False
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
        """Drop what is queued, but the end of a frame already begun, and close with 4100
        behind it: a client that reads again within CLOSE_LINGER sees the code (pusher-js
        then backs off); one that does not is dropped when the linger timer fires."""
        log.info("evicting a client that stopped reading (%d bytes queued)", self._pending_size)
        pending = self._pending
        del pending[1 if self._partial else 0:]
        pending.append(close_frame(ErrorCode.OVER_CAPACITY, "Client too slow"))
        self._pending_size = sum(map(len, pending))
        self.closed = self._closing = True
        self.close_code = ErrorCode.OVER_CAPACITY
        self.close_info = (ErrorCode.OVER_CAPACITY, "Client too slow", "evicted")
        if self._watcher is None and not self._corked:
            self._flush()
        get_hub().loop.timer(CLOSE_LINGER).start(self.shutdown)
        if self.on_evict is not None:
            self.on_evict()

    def _drop(self):
        self.closed = True
        self._pending.clear()
        self._pending_size = 0
        self._partial = False
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
        if isinstance(self._raw, TlsSocket):
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


class TlsSocket:
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


