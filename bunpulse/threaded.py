"""BunPulse under a WSGI server that runs threads, not greenlets: Werkzeug's development server
(`flask --app bunpulse run`, with or without --debug and its reloader).

The core runs in a gevent hub in a thread of its own (threads.HubThread). Each HTTP request's
body is read in the server's thread, exactly Content-Length bytes (Werkzeug's wsgi.input is the
raw stream: reading past them would wait for the client), and the request is answered in the
hub. A WebSocket upgrade gets its 101 here, written on the socket Werkzeug hands over
(`werkzeug.socket`); the connection then runs on BunPulse's own transport, read by the hub's
event loop (on a duplicate of the socket), while the server's thread waits for it to end."""
import io
import logging
import os
import socket
import threading

import gevent
import orjson
from gevent.hub import Hub
from werkzeug.http import HTTP_STATUS_CODES

from . import api
from .errors import ApiError
from .errors import WsClose
from .transport import PusherWebSocket, handshake_headers, handshake_refusal
from .threads import HubThread

log = logging.getLogger("bunpulse")


def in_a_hub():
    """Whether this request runs in a greenlet of a running gevent hub (a gevent server: the
    embedded one, gunicorn's workers) or in the hub's event loop itself (reception.py),
    rather than in a plain thread."""
    return isinstance(gevent.getcurrent(), (gevent.Greenlet, Hub))


class ThreadedDispatch:
    """The WSGI callable for a process that gevent does not patch: requests that arrive in a
    hub's greenlets go straight to `dispatch`, the others are handed to the core's hub."""

    def __init__(self, dispatch, core, max_body):
        self._dispatch = dispatch
        self._core = core
        self._max_body = max_body
        self._hub = None
        self._lock = threading.Lock()

    @property
    def hub(self):
        if self._hub is None:  # started by the first request: never in a reloader's watcher
            with self._lock:
                if self._hub is None:
                    self._hub = HubThread(name="bunpulse-hub",
                                          setup=self._core.metrics.start_flushing)
        return self._hub

    def call(self, func, *args):
        """func(*args) in the core's hub, from any thread; its result."""
        if in_a_hub():
            return func(*args)
        return self.hub.call(func, *args)

    def __call__(self, environ, start_response):
        if in_a_hub():
            return self._dispatch(environ, start_response)
        if environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            return self._upgrade(environ, start_response)
        try:
            body = read_body(environ, self._max_body)
        except ApiError as exc:
            return _refuse(start_response, exc.status, exc.message)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("wsgi.input_terminated", None)
        status, headers, answer = self.hub.call(_respond, self._dispatch, environ)
        start_response(status, headers)
        return [answer]

    def _upgrade(self, environ, start_response):
        sock = environ.get("werkzeug.socket")
        if sock is None or environ.get("REQUEST_METHOD") != "GET" \
                or "upgrade" not in environ.get("HTTP_CONNECTION", "").lower():
            return _refuse(start_response, 400, "Not a WebSocket upgrade this server can "
                                                "hand over: use GET with Connection: Upgrade "
                                                "under flask run, gunicorn or python -m bunpulse")
        refusal = handshake_refusal(environ)
        if refusal is not None:
            status, headers, body = refusal
            start_response(status, headers + [("Content-Length", str(len(body)))])
            return [body]
        ahead = _buffered_ahead(environ["wsgi.input"], sock)
        sock.sendall(b"".join([b"HTTP/1.1 101 Switching Protocols\r\n"] + [
            f"{name}: {value}\r\n".encode("latin-1") for name, value in
            handshake_headers(environ)] + [b"\r\n"]))
        ended = threading.Event()
        self.hub.spawn(self._session, os.dup(sock.fileno()), ahead, api.request_path(environ),
                       api.query_params(environ), ended)
        ended.wait()
        try:  # the hub closed its duplicate: the connection ends with this one
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # Werkzeug writes this status once the application returns (and logs it): the socket
        # is shut down by now, so the write fails as a dropped connection, quietly.
        start_response("101 Switching Protocols", [])
        return []

    def _session(self, fd, ahead, path, query, ended):
        """In the hub: the socket (a duplicate of Werkzeug's) is read by the hub's event loop,
        as BunPulse's own handler's are; `ended` is set once the connection is over and the
        duplicate closed. No greenlet waits meanwhile."""
        raw = socket.socket(fileno=fd)
        raw.setblocking(False)
        ws = None
        try:
            ws = PusherWebSocket(raw, ahead)
            ws.outbox.on_released = ended.set
            self._core.serve_websocket(ws, self._core.admit(path, query))
        except Exception:  # noqa: BLE001 - one connection's bug must not take the hub down
            log.exception("WebSocket session failed")
            if ws is None:
                raw.close()
                ended.set()
            elif not ws.started:
                ws.close(WsClose.GOING_AWAY, "Not served")
                ws.start(None)


def read_body(environ, max_body):
    """The request body, exactly Content-Length bytes (or a chunked body up to max_body);
    ApiError 400 or 413 (before reading) when it cannot be had."""
    stream = environ.get("wsgi.input")
    if environ.get("wsgi.input_terminated"):  # chunked: the server ends the stream
        try:
            body = stream.read(max_body + 1)
        except OSError:
            raise ApiError(400, "Incomplete request body") from None
        if len(body) > max_body:
            raise ApiError(413, f"Request body is larger than {max_body} bytes")
        return body
    length = environ.get("CONTENT_LENGTH", "").strip()
    if not length:
        return b""
    if not length.isdigit():
        raise ApiError(400, "Invalid Content-Length")
    length = int(length)
    if length > max_body:
        raise ApiError(413, f"Request body is larger than {max_body} bytes")
    try:
        body = stream.read(length) if length else b""
    except OSError:
        raise ApiError(400, "Incomplete request body") from None
    if len(body) < length:
        raise ApiError(400, "Incomplete request body")
    return body


def _buffered_ahead(rfile, sock):
    """What the server's buffered reader already holds past the handshake, without waiting."""
    if not hasattr(rfile, "read1"):  # not Werkzeug's reader: nothing was read ahead through it
        return b""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return rfile.read1(1 << 16) or b""
    except OSError:  # nothing buffered and nothing on the socket yet
        return b""
    finally:
        sock.settimeout(timeout)


def _respond(app, environ):
    """Run a WSGI app to the end: (status, headers, body)."""
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, headers

    chunks = app(environ, start_response)
    try:
        body = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    return answer["status"], answer["headers"], body


def _refuse(start_response, status, message):
    body = orjson.dumps({"error": message})
    start_response(f"{status} {HTTP_STATUS_CODES[status].upper()}",
                   [api.JSON_HEADER, ("Content-Length", str(len(body)))])
    return [body]
