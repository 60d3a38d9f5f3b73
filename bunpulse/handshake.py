"""The WebSocket handshake without I/O: accept an upgrade request or refuse it with a status.

One implementation for every way BunPulse answers a handshake itself (its own handler, the
event loop's reception, flask run). gevent-websocket's stock handler answers its own: see
serving/stock_worker.py.
"""
import base64
import hashlib

from .request import Refusal

VERSIONS = ("13", "8", "7")  # RFC 6455 and the drafts gevent-websocket also accepted
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Accept: ")
# Without context takeover on either side, one compression of an event serves every socket,
# and no socket keeps a compressor's or decompressor's window.
_DEFLATE_ANSWER = (b"\r\nSec-WebSocket-Extensions: permessage-deflate; "
                   b"server_no_context_takeover; client_no_context_takeover")
_WINDOW_BITS = {str(bits) for bits in range(8, 16)}


class Handshake:
    """An accepted upgrade: `answer` is the 101 to send (with the first frames, in one
    write); `deflate` says whether permessage-deflate was negotiated."""

    __slots__ = ("answer", "deflate")

    def __init__(self, answer, deflate):
        self.answer, self.deflate = answer, deflate


def accept(method, version, headers, compression):
    """A Handshake, or the Refusal to answer in HTTP. `headers`: the request's, by lower-case
    name (bytes to bytes, as request.Request has them); `compression`: --compression."""
    if method != "GET" or version != "1.1":
        return Refusal(400, "A WebSocket upgrade is a GET in HTTP/1.1")
    if headers.get(b"upgrade", b"").strip().lower() != b"websocket" or \
            b"upgrade" not in headers.get(b"connection", b"").lower():
        return Refusal(400, "Not a WebSocket upgrade: Upgrade: websocket and Connection: "
                            "Upgrade are required")
    if headers.get(b"sec-websocket-version", b"").strip() not in _VERSIONS:
        return Refusal(400, "Unsupported WebSocket version",
                       [("Sec-WebSocket-Version", ", ".join(VERSIONS))])
    key = headers.get(b"sec-websocket-key", b"").strip()
    if not _valid_key(key):
        return Refusal(400, "Invalid Sec-WebSocket-Key")
    offers = headers.get(b"sec-websocket-extensions")
    deflate = bool(compression) and offers is not None and deflate_offered(
        offers.decode("latin-1"))
    return Handshake(switching(accept_key(key), deflate), deflate)


def accept_request(request, compression):
    """`accept` for a request.Request."""
    return accept(request.method, request.version, request.headers, compression)


def accept_environ(environ, compression):
    """`accept` for a WSGI environ (a server that read the request itself: flask run)."""
    protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    headers = {name.encode(): environ[key].encode("latin-1") for name, key in _ENVIRON.items()
               if key in environ}
    return accept(environ.get("REQUEST_METHOD", ""), protocol.partition("/")[2] or "1.1",
                  headers, compression)


_VERSIONS = {version.encode() for version in VERSIONS}
_ENVIRON = {name: "HTTP_" + name.upper().replace("-", "_")
            for name in ("upgrade", "connection", "sec-websocket-version", "sec-websocket-key",
                         "sec-websocket-extensions")}


def accept_key(key):
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (bytes)."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def switching(accept_value, deflate):
    """The 101 answer."""
    return b"".join((_SWITCHING, accept_value, _DEFLATE_ANSWER if deflate else b"",
                     b"\r\n\r\n"))


def deflate_offered(offers):
    """Whether the client's Sec-WebSocket-Extensions offers a permessage-deflate we can take:
    any offer whose parameters allow a server window of 15 bits (compressed once per event,
    the same bytes for every socket)."""
    for offer in (offers or "").split(","):
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


def _valid_key(key):
    if len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False
