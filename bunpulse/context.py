"""The one server context: settings, core, limits and the publish answer, registered once.

`create_app` makes it and keeps it in the Flask app's `extensions["bunpulse"]`; every driver
(serving/) finds it with `context_of(application)`, whatever WSGI callable the server was
given: BunPulse's own app, or a host application (Flask, Django, a dispatcher) that mounts it,
where the server's application is the host's and carries nothing of BunPulse's. So a mounted
BunPulse gets the same timeouts, compression and stop handling as a standalone one, with no
line to copy into the host.
"""
import io
import weakref

from .answers import header_lines, http_date
from .request import RequestReader

_contexts = []  # weak references, newest last: the contexts made in this process


class ServerContext:
    """What serving a request needs of one BunPulse app."""

    def __init__(self, settings, core, max_body, fast_answer, call):
        self.settings = settings
        self.core = core
        self.max_body = max_body
        self.handshake_timeout = settings.handshake_timeout / 1000  # seconds
        self.keepalive_timeout = settings.keepalive_timeout / 1000
        self.compression = settings.compression
        self._fast_answer = fast_answer  # the publish calls' WSGI answer, or None
        self.call = call  # func(*args) run in the core's hub, from any thread
        self.application = None  # the Flask app create_app made (set by it)
        # Whether an upgrade or a publish call may be served in the event loop's callback,
        # where nothing may wait (see BunPulse.requests_at_once and serving/loop.py).
        self.serves_in_the_loop = core.requests_at_once

    def serves_directly(self, application):
        """Whether a server's WSGI application is BunPulse's own, not a host's that mounts
        it: only then are publish calls answered without the application, and requests
        served in the event loop (a host's code may wait)."""
        return application is self.application

    def reader(self, now=None):
        """A RequestReader with this server's limits, for a connection accepted at `now`."""
        return RequestReader(self.max_body, self.handshake_timeout, self.keepalive_timeout, now)


    def answer_publish(self, request, remote):
        """The whole HTTP answer to a publish call (bytes), or None for any other request."""
        environ = request.environ(remote)
        environ["wsgi.input"] = io.BytesIO(request.body)
        response = []
        body = self._fast_answer(environ, lambda status, headers, exc_info=None:
                                 response.extend((status, headers)))
        if body is None:
            return None
        status, headers = response
        return b"".join([b"HTTP/1.1 %s\r\n" % status.encode("latin-1"), header_lines(headers),
                         b"" if request.keep_alive else b"Connection: close\r\n",
                         b"Date: %s\r\n\r\n" % http_date(), *body])

    def draining(self):
        """The worker will stop: /health and /ready answer 503, clients stay for now."""
        self.core.drain()

    def stop(self):
        """The worker stops: every client is told to reconnect (4200)."""
        self.core.shutdown()


def register(context):
    _contexts.append(weakref.ref(context))
    _contexts[:] = [ref for ref in _contexts if ref() is not None]


def context_of(application):
    """The context of the BunPulse app a server serves: the application's own when it is
    BunPulse's, else (a host application that mounts it) the newest one made in this
    process; None when none was made."""
    extensions = getattr(application, "extensions", None)
    if isinstance(extensions, dict) and isinstance(extensions.get("bunpulse"), ServerContext):
        return extensions["bunpulse"]
    for ref in reversed(_contexts):
        context = ref()
        if context is not None:
            return context
    return None
