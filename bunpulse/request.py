"""HTTP requests read without I/O: bytes in, a complete request or a refusal out.

Every request BunPulse reads itself (the event loop's reception and the handler greenlet of
`python -m bunpulse` and of its gunicorn worker) goes through `RequestReader`, so each limit is
written once: the head's size (431), the body's size (413, before the body is read), folded
header lines, bare line feeds and ambiguous framing (400: llhttp refuses them, and a request
two parsers could read two ways is how requests are smuggled), and the one deadline from accept
to a complete request (head, body and, on a TLS port, the TLS handshake before them).
The caller passes the clock in (`now`) and arms a timer for `deadline`; nothing here waits.
"""
import time
from urllib.parse import unquote, unquote_plus

import httptools

from .answers import http_answer

MAX_HEAD = 65536  # bytes of a request head, request line included; past it, 431
HEAD_TOO_LARGE = "Request head larger than 64 KiB"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Refusal:
    """A request answered with an error, after which the connection closes."""

    __slots__ = ("status", "message", "headers")

    def __init__(self, status, message, headers=()):
        self.status, self.message, self.headers = status, message, tuple(headers)

    def answer(self):
        body = b'{"error":"%s"}' % self.message.replace('"', "'").encode("latin-1", "replace")
        return http_answer(self.status, [("Content-Type", "application/json"),
                                         *self.headers], body, keep_alive=False)

    def __repr__(self):
        return f"Refusal({self.status}, {self.message!r})"


# What a client that did not complete its request within the deadline is answered.
TOO_SLOW = Refusal(408, "Request not complete in time")


class Request:
    """A complete request: its head, its whole body, and for an upgrade the bytes that came
    behind the head (the first WebSocket frames)."""

    __slots__ = ("method", "url", "version", "headers", "body", "keep_alive", "upgrade", "ahead",
                 "_parts")

    def __init__(self):
        self.method = ""
        self.url = b""
        self.version = "1.1"
        self.headers = {}  # lower-case name -> value (bytes); repeated ones joined with ","
        self.body = b""
        self.keep_alive = False
        self.upgrade = False
        self.ahead = b""
        self._parts = []

    # httptools' callbacks while it reads the head (the reader does the rest: fewer calls)

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        if b"_" in name:  # X_Forwarded_For would overwrite X-Forwarded-For in the environ:
            return        # dropped, as gunicorn, pywsgi and Werkzeug drop it
        headers = self.headers
        name = name.lower()
        known = headers.get(name)
        headers[name] = value if known is None else known + b"," + value

    @property
    def target(self):
        return self.url.decode("latin-1")

    def environ(self, remote="", base=None):
        """The WSGI environ of the request; `base`: the server's own keys (SERVER_NAME, ...),
        `remote`: the peer's address ("" on a unix socket)."""
        target = self.url.decode("latin-1")
        path, _, query = target.partition("?")
        environ = dict(base) if base else {}
        environ.update({
            "REQUEST_METHOD": self.method, "PATH_INFO": unquote(path, "latin-1"),
            "SCRIPT_NAME": "", "QUERY_STRING": query, "RAW_URI": target,
            "REQUEST_URI": target, "SERVER_PROTOCOL": "HTTP/" + self.version,
            "REMOTE_ADDR": remote})
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


class _Refused(Exception):
    pass


_CHUNKED = object()  # a body whose end the parser finds
# What a parser of a chunked body is fed first, to be where the body starts (the real head
# was read by a parser of its own).
_CHUNKED_HEAD = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
_BLANK = (13, 10)    # CR, LF


class RequestReader:
    """One connection's requests, read from the bytes given to `receive_data`.

    `next_event()` returns the next complete `Request`, a `Refusal` (answer it and close), or
    None while more bytes are needed. `deadline` is when the current request must be complete:
    `handshake_timeout` seconds from the accept for the first, and for a later one (keep-alive)
    `keepalive_timeout` seconds from the last answer until its first byte, then
    `handshake_timeout` seconds from that byte. `data_to_send()` is what the reader itself
    answers before the request is complete (100 Continue)."""

    __slots__ = ("max_body", "handshake_timeout", "keepalive_timeout", "deadline", "_parser",
                 "_current", "_ready", "_refusal", "_body_left", "_buffer",
                 "_searched", "_body_size", "_to_send", "_waiting", "_ended", "_upgrade")

    def __init__(self, max_body, handshake_timeout, keepalive_timeout, now=None):
        self.max_body = max_body
        self.handshake_timeout = handshake_timeout
        self.keepalive_timeout = keepalive_timeout
        self.deadline = (time.monotonic() if now is None else now) + handshake_timeout
        self._parser = None     # httptools', a new one for each request's head
        self._current = None
        self._ready = []        # complete requests not yet taken
        self._refusal = None
        # The parser is fed one part of a request at a time, never past its end, so that each
        # head is measured exactly: None while a head is read, then the body's bytes still to
        # come, or _CHUNKED.
        self._body_left = None
        self._buffer = bytearray()  # bytes received and not yet fed
        self._searched = 0      # where the search for the head's end goes on
        self._body_size = 0
        self._to_send = b""
        self._waiting = False   # between requests on a kept-alive connection
        self._ended = False
        self._upgrade = None    # the upgrade request, once its head is read

    # ---------------------------------------------------------------- input

    def receive_data(self, data, now=None):
        if self._upgrade is not None:  # the new protocol's bytes, for whoever takes them
            self._upgrade.ahead += data
            return
        if self._refusal is not None or self._ended or not data:
            return
        if self._waiting:  # the next request's first byte: its own time starts now
            self._waiting = False
            self.deadline = (time.monotonic() if now is None else now) + self.handshake_timeout
        buffer = self._buffer
        if buffer:  # the start of a head, or a chunked body's tail, came before
            searched = self._searched
            buffer += data  # a bytearray: a head sent a byte at a time costs linear work
            if self._body_left is None and buffer.find(b"\r\n\r\n", searched) < 0:
                self._head_incomplete(buffer, searched)
                return
            data = bytes(buffer)
            self._buffer = bytearray()
        self._feed(data)

    def _feed(self, data):
        """Feed the parser one part of a request at a time, never past the request's end: a
        whole head, then body bytes; what cannot be fed yet is kept in `_buffer`."""
        at, size = 0, len(data)
        while at < size and self._refusal is None and not self._ended:
            left = self._body_left
            if left is None:  # a head: fed whole once its end is here
                if data[at] in _BLANK:  # empty lines before a request are ignored
                    at += 1
                    continue
                end = data.find(b"\r\n\r\n", at)
                if end < 0:
                    self._buffer = bytearray(data[at:])
                    self._head_incomplete(self._buffer, 0)
                    return
                cut = end + 4
                if cut - at > MAX_HEAD:
                    self._refuse(431, HEAD_TOO_LARGE)
                    return
            elif left is _CHUNKED:  # up to each blank line: a chunked body can only end at one
                end = data.find(b"\r\n\r\n", at)
                if end < 0:
                    cut = size - 3  # keep what may be the start of the last blank line
                    if cut <= at:
                        self._buffer = bytearray(data[at:])
                        return
                else:
                    cut = end + 4
            else:  # a body of known length: taken as it comes, the parser has no more to do
                cut = min(at + left, size)
                self._body_left = left - (cut - at)
                self._take_body(data[at:cut] if at or cut < size else data)
                at = cut
                if not self._body_left:
                    self.on_message_complete()
                continue
            piece = data[at:cut] if at or cut < size else data
            at = cut
            if left is None:
                self._head(piece, data, at)
                continue
            try:  # a chunked body, to the parser that decodes it
                self._parser.feed_data(piece)
            except httptools.HttpParserCallbackError as error:
                if self._refusal is None:  # an error of ours, not a refusal
                    raise error.__context__ or error
            except httptools.HttpParserError as error:
                self._refuse(400, f"Malformed request: {_reason(error)}")

    def _head(self, head, data, end):
        """A whole head (`data[:end]` ends with it): parsed by a parser of its own, the
        request itself taking its callbacks; then what it says of the body."""
        request = self._current = Request()
        parser = httptools.HttpRequestParser(request)
        upgrade = False
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            upgrade = True
        except httptools.HttpParserError as error:
            self._refuse(400, f"Malformed request: {_reason(error)}")
            return
        request.method = parser.get_method().decode("latin-1")
        request.version = version = parser.get_http_version()
        if upgrade:
            self._upgraded(data[end:])
            return
        headers = request.headers
        # As llhttp decides it (its own answer is gone once a bodiless request completed).
        connection = headers.get(b"connection")
        tokens = () if connection is None else {
            token.strip() for token in connection.lower().split(b",")}
        request.keep_alive = b"close" not in tokens if version == "1.1" else \
            b"keep-alive" in tokens
        length = headers.get(b"content-length")
        if length is not None and int(length) > self.max_body:
            self._refuse(413, f"Request body is larger than {self.max_body} bytes")
            return
        self._body_size = 0
        coding = headers.get(b"transfer-encoding")
        if coding is not None:  # llhttp lets only codings that end with chunked through
            if coding.strip().lower() != b"chunked":  # gzip, chunked: not decoded here
                self._refuse(501, "Transfer-Encoding other than chunked is not supported")
                return
            self._body_left = _CHUNKED
            self._parser = parser = httptools.HttpRequestParser(self)  # decodes the chunks
            parser.feed_data(_CHUNKED_HEAD)
        else:
            self._body_left = int(length or 0)
        expect = headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and length != b"0" \
                and request.version == "1.1":
            self._to_send = CONTINUE  # curl waits for it before sending a body
        if not self._body_left:
            self.on_message_complete()

    def _head_incomplete(self, buffer, searched):
        """A head without its end yet: refused past the cap or with bare line feeds, else
        the search goes on from where it stopped."""
        if len(buffer) > MAX_HEAD:
            self._refuse(431, HEAD_TOO_LARGE)
        elif buffer.find(b"\n\n", searched) >= 0:  # a head's end in bare line feeds
            self._refuse(400, "Malformed request: lines end with CRLF")
        else:
            self._searched = max(0, len(buffer) - 3)

    def receive_eof(self):
        """The client closed its side: a request it left unfinished is refused (400)."""
        self._ended = True
        if self.started and self._refusal is None:
            in_body = self._current is not None and self._body_left is not None
            self._refuse(400, "Incomplete request body" if in_body else "Incomplete request")

    def next_event(self):
        if self._ready:
            return self._ready.pop(0)
        return self._refusal

    def data_to_send(self):
        data, self._to_send = self._to_send, b""
        return data

    def answered(self, now=None):
        """The last request was answered on a connection kept alive: the next one's first
        byte is due within the keep-alive timeout. Whether bytes of another are here."""
        if self._ready or self._current is not None or self._buffer or self._refusal:
            return True
        self._waiting = True
        self.deadline = (time.monotonic() if now is None else now) + self.keepalive_timeout
        return False

    @property
    def started(self):
        """Bytes of a request not yet complete have arrived."""
        return self._current is not None or bool(self._buffer)

    @property
    def ended(self):
        return self._ended

    def _refuse(self, status, message, headers=()):
        if self._refusal is None:
            self._refusal = Refusal(status, message, headers)
        self._current = self._parser = None

    # ---------------------------------------------------------------- a chunked body

    def on_body(self, body):  # a chunked body's data (known lengths are taken as they come)
        if not self._take_body(body):
            raise _Refused()

    def _take_body(self, body):
        self._body_size += len(body)
        if self._body_size > self.max_body:  # chunked: the size is known only as it comes
            self._refuse(413, f"Request body is larger than {self.max_body} bytes")
            return False
        self._current._parts.append(body)
        return True

    def on_message_complete(self):
        self._body_left = None  # the next request's head, with a parser of its own
        self._parser = None  # (a chunked body's refers to this reader: no cycle left)
        request, self._current = self._current, None
        if request is None:
            return
        parts = request._parts
        request.body = parts[0] if len(parts) == 1 else b"".join(parts)
        request._parts = None
        self._ready.append(request)

    def _upgraded(self, ahead):
        """An upgrade's head is complete: what follows is the new protocol's."""
        request, self._current = self._current, None
        request.upgrade = True
        request.ahead = ahead
        self._buffer = bytearray()
        self._upgrade = request
        request.keep_alive = False
        request._parts = None
        self._ready.append(request)
        self._ended = True  # nothing more is HTTP on this connection


def _reason(error):
    text = str(error)
    return text[:100] if text else type(error).__name__


# ---------------------------------------------------------------- a WSGI environ's request

def query_params(environ):
    """The query string as a dict of first values: the signature's parameters are plain ASCII,
    and werkzeug's MultiDict parse costs more than checking the HMAC."""
    params = {}
    for part in environ.get("QUERY_STRING", "").split("&"):
        if part:
            key, _, value = part.partition("=")
            if "%" in part or "+" in part or not part.isascii():
                key, value = (unquote_plus(x.encode("latin-1").decode("utf-8", "replace"))
                              for x in (key, value))
            params.setdefault(key, value)
    return params


def request_path(environ):
    """The path as werkzeug decodes it: the WSGI string is latin-1, the path UTF-8."""
    return "/" + decoded(environ.get("PATH_INFO", "")).lstrip("/")


def decoded(wsgi_string):
    return wsgi_string.encode("latin-1").decode("utf-8", "replace")
