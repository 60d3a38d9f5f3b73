"""A connection served in a greenlet: what the event loop hands on (serving/loop.py), and every
connection of a TLS port, under `python -m bunpulse` and BunPulse's gunicorn worker.

Requests are read by the one reader (request.py) under its deadline; an upgrade is answered
by handshake.py and served by websocket.serve_upgraded through the WSGI application (a host
application routes it to BunPulse); a publish call is answered without Flask; anything else
is run as a WSGI request (`run_wsgi`). This replaces pywsgi's handler, which read heads
without a deadline and bodies without one at all."""
import io
import logging
import socket
import time

import gevent

from ..context import context_of
from ..logs import printable
from ..handshake import Refusal, accept_request
from ..request import TOO_SLOW
from ..answers import header_lines, http_date, status_line
from ..websocket import PusherWebSocket, detach_socket, not_served

log = logging.getLogger("bunpulse.wsgi")
client_log = logging.getLogger("bunpulse.clients")  # clients' mistakes, at info
READ = 65536
LINGER, LINGER_BYTES = 1.0, 1 << 20  # after a refusal: see _linger


class RequestHandler:
    """pywsgi's handler interface (`handler_class(sock, address, server).handle()`)."""

    reader = None  # the loop's reader, when it hands the connection on part-read
    pending = None  # a request the loop read whole but did not serve
    unsent = b""   # the end of an answer the loop could not write

    def __init__(self, sock, address, server, rfile=None):
        self.socket, self.client_address, self.server = sock, address, server

    def handle(self):
        sock, app = self.socket, self.server.application
        context = context_of(app)
        reader = self.reader or context.reader()
        remote = remote_address(self.client_address)
        direct = context.serves_directly(app)
        try:
            if self.unsent:
                sock.sendall(self.unsent)
            request = self.pending
            while True:
                if request is None:
                    request = self._next(reader)
                if request is None:
                    return
                if isinstance(request, Refusal):
                    client_log.info("bad request from %s: %s", remote or "a unix socket",
                                    printable(request.message))
                    sock.sendall(request.answer())
                    _linger(sock)
                    return
                if request.upgrade:
                    self._upgrade(context, app, request, remote)
                    return
                answer = context.answer_publish(request, remote) if direct else None
                if answer is not None:
                    sock.sendall(answer)
                    keep = request.keep_alive
                else:
                    keep = run_wsgi(app, request, self.server.get_environ(), remote, sock)
                if not keep:
                    return
                reader.answered()
                request = None
        except OSError:
            return
        finally:
            if self.socket is not None:
                self.socket.close()

    def _next(self, reader):
        """The next request, a Refusal, or None once the client is gone or late."""
        sock = self.socket
        while True:
            event = reader.next_event()
            if event is not None or reader.ended:
                return event
            left = reader.deadline - time.monotonic()
            if left <= 0:
                return TOO_SLOW if reader.started else None
            try:
                with gevent.Timeout(left):
                    data = sock.recv(READ)
            except gevent.Timeout:
                continue  # the deadline is looked at above
            if not data:
                reader.receive_eof()
                continue
            reader.receive_data(data)
            to_send = reader.data_to_send()
            if to_send:
                sock.sendall(to_send)

    def _upgrade(self, context, app, request, remote):
        handshake = accept_request(request, context.compression)
        if isinstance(handshake, Refusal):
            self.socket.sendall(handshake.answer())
            return
        environ = request.environ(remote, self.server.get_environ())
        ws = environ["wsgi.websocket"] = PusherWebSocket(
            detach_socket(self.socket), request.ahead, handshake.answer, handshake.deflate)
        self.socket = None  # the socket is the WebSocket's now
        try:
            app(environ, ignore_response)
        finally:
            not_served(ws)


def run_wsgi(app, request, base, remote, sock):
    """Run one request through the WSGI application and write its answer; whether the
    connection may serve another."""
    environ = request.environ(remote, base)
    environ["wsgi.input"] = io.BytesIO(request.body)
    environ["wsgi.input_terminated"] = True
    environ["CONTENT_LENGTH"] = str(len(request.body)) if request.body else ""
    state = {}

    def start_response(status, headers, exc_info=None):
        if exc_info is not None and state.get("sent"):
            raise exc_info[1].with_traceback(exc_info[2])
        state["status"], state["headers"] = status, headers
        return write

    def write(data):
        if request.method == "HEAD":
            data = b""
        if not state.get("sent"):
            state["sent"] = True
            sock.sendall(_head(state, request) + _chunk(state, data))
        elif data:
            sock.sendall(_chunk(state, data))

    try:
        result = app(environ, start_response)
    except Exception:  # noqa: BLE001 - one request's bug must not take the worker down
        log.exception("error serving %s %s", request.method, printable(request.target))
        sock.sendall(Refusal(500, "Internal server error").answer())
        return False
    try:
        chunks = result if isinstance(result, list) else None
        if chunks is not None and not state.get("sent"):  # known length: one write
            body = b"".join(chunks)
            headers = state["headers"]
            if not any(name.lower() == "content-length" for name, _ in headers):
                state["headers"] = headers = [*headers, ("Content-Length", str(len(body)))]
            state["sent"] = True
            sock.sendall(_head(state, request) + (b"" if request.method == "HEAD" else body))
        else:
            for data in result:
                if data:
                    write(data)
            if not state.get("sent"):
                write(b"")
            if state.get("chunked"):
                sock.sendall(b"0\r\n\r\n")
    except OSError:
        raise  # the client is gone: the caller closes (no 500 to write)
    except Exception:  # noqa: BLE001
        log.exception("error serving %s %s", request.method, printable(request.target))
        if not state.get("sent"):
            sock.sendall(Refusal(500, "Internal server error").answer())
        return False
    finally:
        if hasattr(result, "close"):
            result.close()
    return state["keep_alive"]


def _head(state, request):
    """The answer's head; it decides whether the body is chunked and the connection kept."""
    headers = state["headers"]
    names = {name.lower() for name, _ in headers}
    keep = request.keep_alive and "close" not in {
        value.lower() for name, value in headers if name.lower() == "connection"}
    chunked = False
    if "content-length" not in names and request.method != "HEAD" \
            and not state["status"].startswith(("204", "304")):
        if request.version == "1.1":
            chunked = True
        else:
            keep = False  # the body ends with the connection
    state["chunked"], state["keep_alive"] = chunked, keep
    lines = [status_line(state["status"]), header_lines(headers)]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    if "date" not in names:
        lines.append(b"Date: %s\r\n" % http_date())
    lines.append(b"\r\n" if keep else b"Connection: close\r\n\r\n")
    return b"".join(lines)


def _chunk(state, data):
    if state["chunked"] and data:
        return b"%x\r\n%s\r\n" % (len(data), data)
    return data or b""


def _linger(sock):
    """Close after a refusal as nginx does: our side first, then drop what the client still
    sends (at most LINGER_BYTES, for at most LINGER seconds), so that closing with unread
    input does not reset the connection and destroy the answer before the client reads it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        with gevent.Timeout(LINGER, False):
            dropped = 0
            while dropped < LINGER_BYTES:
                data = sock.recv(READ)
                if not data:
                    break
                dropped += len(data)
    except OSError:
        pass


def remote_address(address):
    """REMOTE_ADDR as WSGI servers give it: the peer's host, or "" on a unix socket."""
    return address[0] if isinstance(address, tuple) and address else ""


def ignore_response(status, headers, exc_info=None):
    """start_response for an upgrade: its answer (the 101) is the handshake's."""
    return None
