"""gevent-websocket's stock handler (`gunicorn -k geventwebsocket.gunicorn.workers.
GeventWebSocketWorker "bunpulse:create_app()"`): it upgrades the socket and hands the application
its own WebSocket, which gets close codes, limits and closing wrong for a Pusher server (see
websocket.py). BunPulse takes the socket over, with whatever the handler's buffered reader
already holds past the handshake, and runs its own transport on it: close codes, heartbeats and
limits are then those of BunPulse's own worker; each request head gets --handshake-timeout
(HeadDeadlineHandler). What stays the stock handler's is STOCK_LIMITS.
"""
import io
import logging

import gevent
from geventwebsocket.handler import WebSocketHandler

from ..request import TOO_SLOW
from ..websocket import PusherWebSocket, detach_socket, serve_upgraded
from .body import buffered_ahead, read_body, shut_reading
from .loop import set_nodelay

log = logging.getLogger("bunpulse")

STOCK_LIMITS = (
    "BunPulse is served by gevent-websocket's stock handler: it takes over each upgraded "
    "socket, so close codes, heartbeats and limits are its own, but the stock handler still "
    "reads request heads (no 64 KiB cap: pywsgi's own bounds), answers "
    "the handshake (WebSocket versions 7, 8 and 13, no check of Sec-WebSocket-Key, no "
    "permessage-deflate), parses request headers with the slower email parser and keeps each "
    "connection's request for its whole life (more memory per idle connection); use "
    "BunPulse's own worker (-k bunpulse.worker.PusherWorker) in production")

class HeadDeadlineHandler(WebSocketHandler):
    """The stock handler, with a deadline on each request head: pywsgi reads heads before
    BunPulse is called, with no timeout of its own, so a client that sends nothing, or one byte
    a second, would hold a socket for good. From when the handler waits for a request until its
    head is read, a timer runs; when it fires the socket's reading side is shut, so the read
    ends, and a head that had begun gets 408 (the body has its deadline in stock_request)."""

    head_timeout = 10.0  # seconds: --handshake-timeout (set by arm_head_deadline)
    _late = False

    def handle_one_request(self):
        self._late = False
        self._timer = timer = gevent.get_hub().loop.timer(self.head_timeout)
        timer.start(self._head_too_slow)
        try:
            return super().handle_one_request()
        finally:
            timer.close()

    def read_request(self, raw_requestline):
        try:
            result = super().read_request(raw_requestline)
        finally:
            self._timer.close()
        if self._late:  # the head ended because the timer shut the socket: not a request
            raise _HeadTooSlow("request head not complete in time")
        return result

    def MessageClass(self, *args):
        # pywsgi drops Content-Length beside "Transfer-Encoding: chunked" and reads the body
        # one way: refused instead, as BunPulse's own reader refuses it (request smuggling).
        headers = super().MessageClass(*args)
        if headers.get_all("transfer-encoding") and headers.get_all("content-length"):
            raise ValueError("Content-Length with Transfer-Encoding")
        return headers

    def _handle_client_error(self, ex):
        if isinstance(ex, _HeadTooSlow):
            return "408", TOO_SLOW.answer()
        return super()._handle_client_error(ex)

    def _head_too_slow(self):
        self._late = True
        shut_reading(self.socket)


class _HeadTooSlow(ValueError):
    pass


def arm_head_deadline(context):
    """Under gevent-websocket's worker: its handler class becomes HeadDeadlineHandler, with
    --handshake-timeout. create_app runs before the worker serves (gunicorn loads the
    application first, in the master with --preload), so every server it starts uses it. A
    worker subclass with a handler of its own is left alone."""
    from geventwebsocket.gunicorn.workers import GeventWebSocketWorker
    if GeventWebSocketWorker.wsgi_handler in (WebSocketHandler, HeadDeadlineHandler):
        GeventWebSocketWorker.wsgi_handler = HeadDeadlineHandler
        HeadDeadlineHandler.head_timeout = context.handshake_timeout


_noted = False
_watched = set()


def note_stock_handler():
    """Say once per process what the stock handler keeps (STOCK_LIMITS)."""
    global _noted
    if not _noted:
        _noted = True
        log.warning(STOCK_LIMITS)


def serve_stock_websocket(context, environ):
    """Run one Pusher connection on the socket the stock handler upgraded (its 101 is sent):
    the socket is detached from the handler and served by websocket.serve_upgraded, as every
    driver's are. Blocks until the connection is over, as the stock handler expects of the
    application: its worker exits once no handler runs, which would cut clients off before
    their 4200, and pywsgi closes the handler's socket when the handler returns."""
    note_stock_handler()
    stock = environ["wsgi.websocket"]
    handler = stock.handler
    stock.closed = True  # neither the stock handler nor its __del__ sends a close frame now
    _watch(context, handler.server)
    set_nodelay(handler.socket)
    ahead = _buffered_ahead(handler)
    ws = environ["wsgi.websocket"] = PusherWebSocket(detach_socket(handler.socket), ahead)
    serve_upgraded(context, ws, environ)
    ws.wait()


def stock_request(context, environ):
    """An HTTP request the stock handler read the head of: Nagle off on its socket (pywsgi
    writes headers and body apart: on a keep-alive connection the body would wait for the
    client's delayed ACK), and its body read here, within the handshake timeout and the body
    limit, so that a client that stops sending holds nothing for long. An ApiError (400, 413)
    when it cannot be had, or a gevent.Timeout when it comes too slowly."""
    stream = environ.get("wsgi.input")
    sock = getattr(stream, "socket", None)
    if sock is not None:
        set_nodelay(sock)
    with gevent.Timeout(context.handshake_timeout):
        body = read_body(environ, context.max_body)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body)) if body else ""
    environ["wsgi.input_terminated"] = True


def _buffered_ahead(handler):
    """What the handler's buffered reader already holds past the handshake; then the reader
    is closed, which frees its buffer and leaves the socket open."""
    data = buffered_ahead(handler.rfile, handler.socket)
    body = handler.wsgi_input
    if body is None or not (body.content_length or body.chunked_input):
        handler.rfile.close()  # pywsgi reads it again only to discard a request body
    return data


class _ClientTable(dict):
    """The stock handler's table of connections, keyed by peer address: every unix-socket
    peer has the same one, so a second connection's end would find its entry gone."""

    def __delitem__(self, key):
        self.pop(key, None)


def _watch(context, server):
    """Once per listening server: tolerate shared peer addresses, and when the worker stops
    (it closes the server: the stock worker tells the application nothing), tell every client
    to reconnect at once (4200), as BunPulse's own worker does."""
    if id(server) in _watched:
        return
    _watched.add(id(server))
    server.clients = _ClientTable(getattr(server, "clients", {}))

    def stop_when_closed():
        while not server.closed:
            gevent.sleep(0.2)
        context.stop()

    # In the server's pool: gunicorn's worker exits once its pool is empty (or after its
    # graceful_timeout), so the stop gets its --shutdown-grace-ms there too.
    pool = getattr(server, "pool", None)
    (pool.spawn if pool is not None else gevent.spawn)(stop_when_closed)
