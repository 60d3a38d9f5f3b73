"""An HTTP POST with one deadline for the whole exchange: connect, send, and the whole answer.

requests' timeout bounds each read, so a receiver that answers one byte at a time holds a
request as long as it likes. Here a watchdog timer shuts the request's socket down at the
deadline; a shutdown wakes the read whether the caller is a real thread (a host program that
is not patched) or a gevent greenlet (the CLI, gunicorn), and requests then raises as for any
broken connection. Everything else is requests' own: TLS and its CA bundle, credentials in
the URL, proxies, a connection kept alive between requests.
"""
import socket
import threading

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_sending = threading.local()  # the calling thread's (or greenlet's) _Watch


class DeadlineExceeded(requests.exceptions.Timeout):
    """The whole exchange took longer than its deadline."""


class _Watch:
    """One request's watchdog: the socket it goes out on, shut down when the time is up."""

    def __init__(self, seconds):
        self.fired = False
        self._sock = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self):
        _sending.watch = self
        self._timer.start()
        return self

    def __exit__(self, *exc):
        _sending.watch = None
        with self._lock:
            self._timer.cancel()
            self._sock = None  # done: the socket may serve the next request

    def attach(self, sock):
        """The socket the request uses now (new, or kept alive from an earlier request)."""
        with self._lock:
            self._sock = sock
            if self.fired:
                _shut(sock)

    def _fire(self):
        with self._lock:
            self.fired = True
            if self._sock is not None:
                _shut(self._sock)


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _watched(connection_class):
    class Watched(connection_class):
        def _new_conn(self):  # a new socket, watched from before its TLS handshake
            sock = super()._new_conn()
            _attach(sock)
            return sock

        def request(self, *args, **kwargs):  # a socket kept alive from an earlier request
            if self.sock is not None:
                _attach(self.sock)
            return super().request(*args, **kwargs)
    return Watched


def _attach(sock):
    watch = getattr(_sending, "watch", None)
    if watch is not None:
        watch.attach(sock)


class _HttpPool(HTTPConnectionPool):
    ConnectionCls = _watched(HTTPConnection)


class _HttpsPool(HTTPSConnectionPool):
    ConnectionCls = _watched(HTTPSConnection)


_POOLS = {"http": _HttpPool, "https": _HttpsPool}


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager


def deadline_session():
    """A requests Session whose `post_within` keeps to one deadline."""
    session = requests.Session()
    adapter = _Adapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def post_within(session, seconds, url, **kwargs):
    """`session.post(url, **kwargs)` (a deadline_session) that ends, answer read or not,
    `seconds` after it starts; raise DeadlineExceeded past it."""
    with _Watch(seconds) as watch:
        try:
            response = session.post(url, timeout=seconds, **kwargs)
        except requests.RequestException:
            if not watch.fired:
                raise
            response = None
        # Once the socket is shut, http.client may take what came before as a whole answer
        # (headers end at EOF): nothing read after the deadline counts.
        if watch.fired:
            raise DeadlineExceeded(f"no whole answer within {seconds:g} s")
        return response
