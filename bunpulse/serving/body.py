"""What BunPulse reads through another server's reader where that server read the request head
(gevent-websocket's stock worker, Werkzeug's `flask run`): the bytes already buffered past an
upgrade's head, and a request body: exactly Content-Length bytes (Werkzeug's stream is the raw
socket: reading past them would wait for the client), a chunked body up to the limit, 413
before reading past `max_body`, 400 when it stops short or its framing is ambiguous. The caller
bounds the time, and closes the connection after a refusal."""
import socket

from ..errors import ApiError


def read_body(environ, max_body):
    """The request body; ApiError 400 or 413 (before reading), or 501 for a transfer coding
    other than chunked, when it cannot be had. After any of them the connection must close:
    where the next request starts is then not known."""
    stream = environ.get("wsgi.input")
    length = environ.get("CONTENT_LENGTH", "").strip()
    coding = environ.get("HTTP_TRANSFER_ENCODING")
    chunked = coding is not None
    if chunked:  # refused as the request reader refuses it: one framing, or none
        codings = [part.strip().lower() for part in coding.split(",")]
        if length:
            raise ApiError(400, "Malformed request: Content-Length with Transfer-Encoding")
        if codings[-1] != "chunked" or codings.count("chunked") > 1:
            raise ApiError(400, "Malformed request: chunked must be the last transfer coding")
        if len(codings) > 1:
            raise ApiError(501, "Transfer-Encoding other than chunked is not supported")
    if chunked or (not length and environ.get("wsgi.input_terminated")):  # the server ends it
        try:
            body = stream.read(max_body + 1)
        except (OSError, ValueError):
            raise ApiError(400, "Incomplete request body") from None
        if len(body) > max_body:
            raise ApiError(413, f"Request body is larger than {max_body} bytes")
        return body
    if not length:
        return b""
    if not length.isdigit():
        raise ApiError(400, "Invalid Content-Length")
    length = int(length)
    if length > max_body:
        raise ApiError(413, f"Request body is larger than {max_body} bytes")
    try:
        body = stream.read(length) if length else b""
    except (OSError, ValueError):
        raise ApiError(400, "Incomplete request body") from None
    if len(body) < length:
        raise ApiError(400, "Incomplete request body")
    return body


def buffered_ahead(rfile, sock):
    """What the server's buffered reader already holds past the handshake (a client may send
    frames right behind it), taken without waiting for more."""
    if not hasattr(rfile, "read1"):  # not a buffered reader: nothing was read ahead through it
        return b""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return rfile.read1(1 << 16) or b""
    except OSError:  # nothing buffered and nothing on the socket yet
        return b""
    finally:
        sock.settimeout(timeout)


def shut_reading(sock):
    """The head deadline of another server's reader (stock_worker, flask_run) passed: its read
    ends, as if the client had stopped, and the 408 can still be written."""
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
