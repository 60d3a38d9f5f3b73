"""The load generator: one single-threaded epoll loop over raw non-blocking sockets.
WebSocket frames are parsed and every benchmark event counted at the receiving socket; the HTTP
API is driven over keep-alive connections with signed requests."""
import hashlib
import json
import os
import resource
import select
import socket
import time

from bunpulse.signatures import sign_api_request

from . import BenchError

MARK = b"BPB|"             # in the data of every benchmark event: tells deliveries from control
EVENT = "bench-ev"
PAYLOAD_SIZE = 150          # bytes of event data, as in the issue
RECV_SIZE = 1 << 18
# One receive buffer for every socket (the loop is single-threaded): recv(N) would allocate, and
# above malloc's mmap threshold unmap, N bytes on every call.
RECV_BUF = bytearray(RECV_SIZE)


def signed_path(method, path, body, key, secret, extra=None):
    """path?query for the HTTP API, signed as the Pusher libraries sign it (auth_version 1.0)."""
    params = {"auth_key": key, "auth_timestamp": str(int(time.time())), "auth_version": "1.0"}
    if body:
        params["body_md5"] = hashlib.md5(body).hexdigest()
    params.update(extra or {})
    query = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{path}?{query}&auth_signature={sign_api_request(secret, method, path, params)}"


def event_data(seq, pad_to=PAYLOAD_SIZE):
    """`BPB|seq|monotonic_ns|xxx...`: PAYLOAD_SIZE bytes, with the send time embedded."""
    head = f"BPB|{seq}|{time.monotonic_ns()}|"
    return head + "x" * max(0, pad_to - len(head))


def raise_fd_limit(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


class Loop:
    """A single-threaded epoll loop; handlers have `fd` and `on_event(events)`."""

    def __init__(self):
        self.epoll = select.epoll()
        self.handlers = {}
        self.deliveries = 0       # benchmark events received, all sockets together
        self.latencies = None     # list of ns when the scenario measures latency
        self.errors = []          # pusher:error and unexpected closes, kept short
        self.error_count = 0

    def add(self, handler, events):
        self.handlers[handler.fd] = handler
        self.epoll.register(handler.fd, events)

    def modify(self, handler, events):
        self.epoll.modify(handler.fd, events)

    def remove(self, handler):
        if self.handlers.pop(handler.fd, None) is not None:
            try:
                self.epoll.unregister(handler.fd)
            except (OSError, ValueError):
                pass

    def note_error(self, text):
        self.error_count += 1
        if len(self.errors) < 10:
            self.errors.append(text)

    def poll_once(self, timeout):
        handlers = self.handlers
        for fd, events in self.epoll.poll(timeout, 4096):
            handler = handlers.get(fd)
            if handler is not None:
                handler.on_event(events)

    def run_until(self, done, timeout, what, tick=None, tick_every=0.05):
        """Serve sockets until done() is true; BenchError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            now = time.monotonic()
            if now >= deadline:
                raise BenchError(f"timed out after {timeout:.1f}s waiting for {what}")
            wait = min(deadline - now, tick_every)
            if tick is not None:
                wait = min(wait, max(0.0, tick()))
            self.poll_once(wait)

    def close(self):
        for handler in list(self.handlers.values()):
            handler.close()
        self.epoll.close()


EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
CONNECTING, HANDSHAKE, OPEN, CLOSED = range(4)


def client_frame(payload, opcode=0x1):
    """A final, masked client frame; the all-zero mask leaves the payload as it is."""
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 0x10000:
        header = bytes((0x80 | opcode, 0xFE)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0xFF)) + length.to_bytes(8, "big")
    return header + b"\0\0\0\0" + payload


def json_frame(obj):
    return client_frame(json.dumps(obj, separators=(",", ":")).encode())


PING_FRAME = json_frame({"event": "pusher:ping", "data": {}})
PONG_FRAME = json_frame({"event": "pusher:pong", "data": {}})


class Ws:
    """One WebSocket client. Benchmark events (MARK in the payload) are only counted (and
    timed when the loop measures latency); every other message goes to `owner.on_message`."""

    __slots__ = ("loop", "owner", "index", "sock", "fd", "state", "buf", "out", "count",
                 "checksum", "socket_id", "frag", "close_code", "user", "pending", "t_start")

    def __init__(self, loop, owner, index, address, request):
        self.loop, self.owner, self.index = loop, owner, index
        self.state, self.buf, self.out, self.frag = CONNECTING, b"", request, None
        self.count = self.checksum = 0
        self.socket_id = self.close_code = self.user = None
        self.pending = 0
        self.t_start = time.monotonic()
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = sock.fileno()
        err = sock.connect_ex(address)
        if err not in (0, 115):  # EINPROGRESS
            sock.close()
            raise BenchError(f"connect: {os.strerror(err)}")
        loop.add(self, EPOLLOUT)

    # ---------------------------------------------------------------- I/O

    def on_event(self, events):
        if events == EPOLLIN and self.state == OPEN:  # the hot path
            try:
                n = self.sock.recv_into(RECV_BUF)
            except BlockingIOError:
                return
            except OSError as exc:
                return self._lost(f"recv: {exc}")
            if not n:
                return self._lost("EOF")
            if self.buf:
                data = self.buf + RECV_BUF[:n]
                self._frames(data, len(data))
                return
            # Fan-out's usual read: exactly one whole text frame with a benchmark event.
            length = RECV_BUF[1]
            if RECV_BUF[0] == 0x81 and self.loop.latencies is None and (
                    n == length + 2 if length < 126 else
                    length == 126 and n == ((RECV_BUF[2] << 8) | RECV_BUF[3]) + 4) and \
                    RECV_BUF.find(MARK, 2, n) >= 0:
                self.count += 1
                self.loop.deliveries += 1
                return
            self._frames(RECV_BUF, n)
            return
        if events & EPOLLOUT:
            if self.state == CONNECTING:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    return self._lost(f"connect: {os.strerror(err)}")
                self.state = HANDSHAKE
            self._flush()
        if events & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and self.state != CLOSED:
            self._readable()

    def send(self, data):
        if self.state == CLOSED:
            return
        if self.out:
            self.out += data
            return
        if self.state != OPEN:
            self.out = data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            return self._lost(f"send: {exc}")
        if sent < len(data):
            self.out = data[sent:]
            self.loop.modify(self, EPOLLIN | EPOLLOUT)

    def _flush(self):
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                return self._lost(f"send: {exc}")
            self.out = self.out[sent:]
        self.loop.modify(self, EPOLLIN | EPOLLOUT if self.out else EPOLLIN)

    def _readable(self):
        try:
            n = self.sock.recv_into(RECV_BUF)
        except BlockingIOError:
            return
        except OSError as exc:
            return self._lost(f"recv: {exc}")
        if not n:
            return self._lost("EOF")
        data = self.buf + RECV_BUF[:n]
        if self.state == HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = bytes(data)
                return
            if not data.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101")):
                return self._lost(f"handshake refused: {data[:40]!r}")
            self.state = OPEN
            data = data[end + 4:]
            if self.out and self.sock is not None:  # frames queued before the upgrade
                self._flush()
        self._frames(data, len(data))

    def _frames(self, data, n):
        """Count the messages in data[:n]; keep an incomplete last frame for the next read."""
        i, delivered = 0, 0
        find = data.find
        latencies = self.loop.latencies
        now = time.monotonic_ns() if latencies is not None else 0
        while n - i >= 2:
            length = data[i + 1]
            if length < 126:
                start = i + 2
            elif length == 126:
                if n - i < 4:
                    break
                length, start = (data[i + 2] << 8) | data[i + 3], i + 4
            elif length == 127:
                if n - i < 10:
                    break
                length, start = int.from_bytes(data[i + 2:i + 10], "big"), i + 10
            else:
                return self._lost("masked frame from the server")
            end = start + length
            if end > n:
                break
            if data[i] == 0x81:  # a final text frame: the common case
                mark = find(MARK, start, end)
                if mark >= 0:
                    delivered += 1
                    if latencies is not None:
                        self._timed(data, mark + 4, end, now, latencies)
                else:
                    self.owner.on_message(self, bytes(data[start:end]))
            else:
                self._other_frame(data[i], bytes(data[start:end]))
                if self.state == CLOSED:
                    return
            i = end
        self.buf = bytes(data[i:n]) if i < n else b""
        if delivered:
            self.count += delivered
            self.loop.deliveries += delivered

    def _timed(self, data, at, end, now, latencies):
        bar = data.find(b"|", at, end)
        bar2 = data.find(b"|", bar + 1, end)
        seq = int(data[at:bar])
        latencies.append(now - int(data[bar + 1:bar2]))
        self.checksum += seq

    def _other_frame(self, first, payload):
        opcode, fin = first & 0x0F, first & 0x80
        if opcode in (0x1, 0x2, 0x0):   # a fragmented message (never from BunPulse)
            self.frag = payload if opcode else (self.frag or b"") + payload
            if fin:
                message, self.frag = self.frag, None
                if MARK in message:
                    self.count += 1
                    self.loop.deliveries += 1
                    if self.loop.latencies is not None:
                        at = message.find(MARK) + 4
                        self._timed(message, at, len(message), time.monotonic_ns(),
                                    self.loop.latencies)
                else:
                    self.owner.on_message(self, message)
        elif opcode == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._lost(f"closed by the server: {self.close_code} {payload[2:60]!r}")
        elif opcode == 0x9:
            self.send(client_frame(payload, 0xA))

    def _lost(self, why):
        if self.state != CLOSED:
            self.close()
            self.owner.on_lost(self, why)

    def close(self):
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.loop.remove(self)
        try:
            self.sock.close()
        except OSError:
            pass


class Http:
    """One keep-alive HTTP/1.1 connection with one request in flight at a time."""

    __slots__ = ("loop", "address", "host", "sock", "fd", "buf", "out", "busy", "t_sent",
                 "ctx", "on_response")

    def __init__(self, loop, address, on_response):
        self.loop, self.address, self.on_response = loop, address, on_response
        self.host = f"{address[0]}:{address[1]}"
        self.sock = None
        self._connect()

    def _connect(self):
        if self.sock is not None:
            self.loop.remove(self)
            self.sock.close()
        sock = self.sock = socket.create_connection(self.address, timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.fd, self.buf, self.out, self.busy, self.ctx = sock.fileno(), b"", b"", False, None
        self.loop.add(self, EPOLLIN)

    def request(self, method, target, body=b"", ctx=None):
        assert not self.busy
        head = (f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        data = head.encode() + body
        self.busy, self.ctx, self.t_sent = True, ctx, time.monotonic_ns()
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.out = data[sent:]
            self.loop.modify(self, EPOLLIN | EPOLLOUT)

    def on_event(self, events):
        if events & EPOLLOUT and self.out:
            sent = self.sock.send(self.out)
            self.out = self.out[sent:]
            if not self.out:
                self.loop.modify(self, EPOLLIN)
        if events & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._failed("connection closed by the server")
                return
            self.buf += data
            self._parse()

    def _parse(self):
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = buf[:end].lower()
        status = int(buf[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            line_end = head.find(b"\r\n", at + 2)
            length = int(head[at + 17:line_end if line_end >= 0 else len(head)])
            if len(buf) < end + 4 + length:
                return
            body, self.buf = buf[end + 4:end + 4 + length], buf[end + 4 + length:]
        elif b"transfer-encoding: chunked" in head:
            body, rest = self._dechunk(buf[end + 4:])
            if body is None:
                return
            self.buf = rest
        else:
            self._failed("response without Content-Length")
            return
        ctx, t_sent = self.ctx, self.t_sent
        self.busy, self.ctx = False, None
        if b"connection: close" in head:
            self._connect()
        self.on_response(self, status, body, ctx, time.monotonic_ns() - t_sent)

    @staticmethod
    def _dechunk(data):
        body, at = [], 0
        while True:
            line_end = data.find(b"\r\n", at)
            if line_end < 0:
                return None, None
            size = int(data[at:line_end].split(b";")[0], 16)
            if len(data) < line_end + 2 + size + 2:
                return None, None
            if size == 0:
                return b"".join(body), data[line_end + 4:]
            body.append(data[line_end + 2:line_end + 2 + size])
            at = line_end + 2 + size + 2

    def _failed(self, why):
        ctx, was_busy = self.ctx, self.busy
        self.loop.note_error(f"http: {why}")
        self._connect()
        if was_busy:
            self.on_response(self, 0, b"", ctx, 0)

    def close(self):
        self.loop.remove(self)
        self.sock.close()


