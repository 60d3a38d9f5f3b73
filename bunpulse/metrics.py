"""Prometheus metrics, and the listener of their own that serves them (`--metrics-port`).

Metrics are off (every metric a no-op) unless a metrics port is configured. Under gunicorn
the counters live in prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, set up
by gunicorn.conf.py) and the master serves one scrape for every worker. The hot paths count
once per event, never once per delivery, in plain ints that a flush adds to their counters.
"""
import logging
import os
import re
import threading
import time

from .errors import ErrorCode
from .logs import printable
from .request import decoded

log = logging.getLogger("bunpulse.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_EVERY = 1.0  # seconds between two flushes of the counts kept as ints
HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# (name without bunpulse_, kind, help, labels)
APP = ("app_id",)
METRICS = (
    ("connections", "gauge", "Open WebSocket connections", APP),
    ("connections_opened_total", "counter", "WebSocket connections accepted", APP),
    ("connections_closed_total", "counter",
     "WebSocket connections closed, by close code (1006: no close frame)", APP + ("code",)),
    ("channels", "gauge", "Occupied channels (per worker: a channel with subscribers in two "
                          "workers counts twice)", APP),
    ("subscriptions", "gauge", "Channel subscriptions", APP),
    ("ws_messages_received_total", "counter", "WebSocket messages received from clients", APP),
    ("ws_messages_sent_total", "counter", "WebSocket messages sent to clients", APP),
    ("ws_bytes_received_total", "counter", "Payload bytes of messages received", APP),
    ("ws_bytes_sent_total", "counter", "Bytes of WebSocket frames sent", APP),
    ("events_published_total", "counter",
     "Events published through the HTTP API or the library, one per channel", APP),
    ("client_events_total", "counter", "Client events accepted and relayed", APP),
    ("webhooks_sent_total", "counter", "Webhook events delivered", APP),
    ("webhooks_failed_total", "counter", "Webhook requests that failed (retried later)", APP),
    ("webhooks_dropped_total", "counter",
     "Webhook events dropped: queue full or retries exhausted", APP + ("reason",)),
    ("evictions_total", "counter", "Clients closed with 4100 because they stopped reading", APP),
    ("http_requests_total", "counter", "HTTP API requests", ("endpoint", "status")),
    ("http_request_duration_seconds", "histogram", "HTTP API request duration", ("endpoint",)),
    ("redis_up", "gauge", "1 while Redis is reachable (the least over workers)", ()),
    ("redis_relay_errors_total", "counter",
     "Messages that could not be relayed through Redis, and listener failures", ()),
)


# Close codes counted under a label of their own: RFC 6455's and the Pusher protocol's. A
# client may close with any code of 3000-4999; a label value per code it makes up would be a
# time series each, so the rest count as "other".
NAMED_CLOSE_CODES = frozenset(range(1000, 1016)) | frozenset(int(code) for code in ErrorCode)


def close_code_label(code):
    """The connections_closed_total label of a close code: the code, or "other"."""
    return str(code) if code in NAMED_CLOSE_CODES else "other"


class _Null:
    """What every metric is while metrics are off."""

    __slots__ = ()

    def inc(self, amount=1):
        pass

    dec = set = observe = inc

    def labels(self, *values):
        return self


NULL = _Null()


# Counted as plain ints where they happen (every event, message and delivery batch) and added
# to their counters by `Metrics.flush`, about once a second: a counter's inc() would cost
# more than the send it counts on a small channel.
BATCHED = ("ws_messages_sent_total", "ws_bytes_sent_total", "ws_messages_received_total",
           "ws_bytes_received_total", "events_published_total", "client_events_total")


class AppMetrics:
    """One app's metrics: the BATCHED counts as ints (`sent`, `sent_bytes`, `received`,
    `received_bytes`, `published`, `client_events`), the rest as children with their app_id
    label bound once (NULL while metrics are off)."""

    __slots__ = ("sent", "sent_bytes", "received", "received_bytes", "published",
                 "client_events", "connections", "connections_opened_total", "channels",
                 "subscriptions", "webhooks_sent_total", "webhooks_failed_total",
                 "evictions_total", "_families", "_app_id", "_children")
    _COUNTS = ("sent", "sent_bytes", "received", "received_bytes", "published",
               "client_events")

    def __init__(self, families, app_id):
        self._families = families
        self._app_id = app_id
        self._children = {}
        for count in self._COUNTS:
            setattr(self, count, 0)
        for name, _, _, labels in METRICS:
            if labels == APP and name not in BATCHED:
                setattr(self, name, families[name].labels(app_id) if families else NULL)

    def flush(self):
        """Add what was counted since the last flush to the counters."""
        if not self._families:
            for count in self._COUNTS:  # off: nothing to add them to
                setattr(self, count, 0)
            return
        for count, name in zip(self._COUNTS, BATCHED):
            value = getattr(self, count)
            if value:
                setattr(self, count, 0)  # before inc(): no switch to another greenlet between
                self._child(name).inc(value)

    def _child(self, name, *values):
        child = self._children.get((name, values))
        if child is None:
            child = self._children[(name, values)] = self._families[name].labels(
                self._app_id, *map(str, values))
        return child

    def closed(self, code):
        """connections_closed_total for one close code (under "other" when not a named one)."""
        return self._child("connections_closed_total", close_code_label(code)) \
            if self._families else NULL

    def webhooks_dropped(self, reason):
        """webhooks_dropped_total for one reason: queue_full or retries_exhausted."""
        return self._child("webhooks_dropped_total", reason) if self._families else NULL


_families = None
_families_lock = threading.Lock()
_flushing = []  # the Metrics of this process that flush (the embedded listener flushes them)


def _build_families():
    from prometheus_client import Counter, Gauge, Histogram
    families = {}
    for name, kind, doc, labels in METRICS:
        full = "bunpulse_" + name
        if kind == "counter":
            metric = Counter(full, doc, labels)
        elif kind == "gauge":
            metric = Gauge(full, doc, labels, multiprocess_mode="livemin" if name == "redis_up"
                           else "livesum")
        else:
            metric = Histogram(full, doc, labels, buckets=HTTP_BUCKETS)
        families[name] = metric
    return families


class Metrics:
    """The metrics of one process: `app(app_id)` for per-app ones, attributes for the rest."""

    def __init__(self, enabled):
        self.enabled = enabled
        self._apps = {}
        self._flusher = None
        self._families = None
        if enabled:
            global _families
            with _families_lock:  # one set per process, shared by every core in it
                if _families is None:
                    _families = _build_families()
            self._families = _families
            self.redis_up = _families["redis_up"]
            self.redis_relay_errors = _families["redis_relay_errors_total"]
            self.http_requests = _families["http_requests_total"]
            self.http_duration = _families["http_request_duration_seconds"]
        else:
            self.redis_up = self.redis_relay_errors = NULL
            self.http_requests = self.http_duration = NULL

    def app(self, app_id):
        metrics = self._apps.get(app_id)
        if metrics is None:
            metrics = self._apps[app_id] = AppMetrics(self._families, app_id)
        return metrics

    def flush(self):
        for metrics in list(self._apps.values()):
            metrics.flush()

    def start_flushing(self, every=FLUSH_EVERY):
        """Flush now and then, in the current gevent hub (the one that serves)."""
        if self.enabled and self._flusher is None:
            import gevent

            def loop():
                while True:
                    gevent.sleep(every)
                    self.flush()
            self._flusher = gevent.spawn(loop)
            _flushing.append(self)

    def stop_flushing(self):
        if self._flusher is not None:
            self._flusher.kill(block=False)
            self._flusher = None
            _flushing.remove(self)
        self.flush()


# ------------------------------------------------------------------ the HTTP API's metrics

_API_ENDPOINTS = (
    (re.compile(r"^/apps/[^/]+/events$"), "events"),
    (re.compile(r"^/apps/[^/]+/batch_events$"), "batch_events"),
    (re.compile(r"^/apps/[^/]+/channels$"), "channels"),
    (re.compile(r"^/apps/[^/]+/channels/.+/users$"), "channel_users"),
    (re.compile(r"^/apps/[^/]+/channels/.+$"), "channel"),
    (re.compile(r"^(/apps/[^/]+)?/users/[^/]+/terminate_connections$"), "terminate_connections"),
    (re.compile(r"^/health$"), "health"),
    (re.compile(r"^/ready$"), "ready"),
)


def endpoint_of(path):
    """A bounded label for a request path: the route it matches, or 'other'."""
    for pattern, name in _API_ENDPOINTS:
        if pattern.match(path):
            return name
    return "other"


PROBES = ("health", "ready")  # polled every few seconds: not worth a line each


def _log_access(access, environ, path, status, elapsed):
    # The path without its query string: nothing of a signature or a key in the log. What the
    # client sent is escaped (a %0A in the path would start a forged line).
    method, remote = environ.get("REQUEST_METHOD"), environ.get("REMOTE_ADDR", "-")
    path = printable(decoded(path))
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    fields = {"method": method, "path": path, "status": int(status),
              "duration_ms": round(elapsed * 1000, 2), "remote_addr": remote}
    if forwarded:
        fields["forwarded_for"] = forwarded = printable(forwarded)
    access.info("%s %s %s %.1fms from %s%s", method, path, status, elapsed * 1000, remote,
                f" (forwarded for {forwarded})" if forwarded else "", extra=fields)


def instrument(wsgi_app, metrics, access_log=False):
    """WSGI middleware for the HTTP API (not upgrades): request count and duration by endpoint
    and status, and with access_log one log line a request (health probes aside)."""
    if not metrics.enabled and not access_log:
        return wsgi_app
    access = logging.getLogger("bunpulse.access")
    requests_total, duration = metrics.http_requests, metrics.http_duration

    def application(environ, start_response):
        started = time.perf_counter()
        status = ["500"]

        def recording_start_response(status_line, headers, exc_info=None):
            status[0] = status_line[:3]
            return start_response(status_line, headers, exc_info)

        try:
            return wsgi_app(environ, recording_start_response)
        finally:
            elapsed = time.perf_counter() - started
            path = environ.get("PATH_INFO", "")
            endpoint = endpoint_of(path)
            requests_total.labels(endpoint, status[0]).inc()
            duration.labels(endpoint).observe(elapsed)
            if access_log and endpoint not in PROBES:
                _log_access(access, environ, path, status[0], elapsed)
    return application


# ------------------------------------------------------------------ the metrics listener

def _registry():
    """What one scrape collects: this process, or every gunicorn worker in multiprocess mode."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(WorkerProcesses(_worker_pids))
    return registry


_worker_pids = lambda: ()  # noqa: E731 - replaced by gunicorn.conf.py in the master


def set_worker_pids(source):
    global _worker_pids
    _worker_pids = source


class WorkerProcesses:
    """process_* metrics of the master and of every worker, labelled by pid (multiprocess
    mode has none of its own)."""

    def __init__(self, pids):
        self._pids = pids

    def collect(self):
        from prometheus_client import ProcessCollector
        from prometheus_client.metrics_core import Metric
        merged = {}
        for pid in (os.getpid(), *self._pids()):
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
            for family in collector.collect():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
                for sample in family.samples:
                    into.add_sample(sample.name, dict(sample.labels, pid=str(pid)),
                                    sample.value)
        return list(merged.values())


def stats(registry=None):
    """A short JSON summary of the metrics, summed over labels and workers."""
    registry = registry or _registry()
    totals = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith("bunpulse_") and not sample.name.endswith(
                    ("_bucket", "_created", "_sum", "_count")):
                key = sample.name[len("bunpulse_"):]
                totals[key] = totals.get(key, 0) + sample.value
    keys = ("connections", "channels", "subscriptions", "connections_opened_total",
            "events_published_total", "client_events_total", "ws_messages_sent_total",
            "evictions_total", "webhooks_sent_total", "webhooks_failed_total",
            "webhooks_dropped_total", "redis_relay_errors_total")
    return {key: int(totals.get(key, 0)) for key in keys}


def _flush_here():
    # A scrape of the embedded server sees every count up to now (under gunicorn the
    # workers flush on their own and the master has nothing to flush).
    for metrics in list(_flushing):
        metrics.flush()


def metrics_app(environ, start_response):
    """The metrics listener's WSGI app: /metrics (Prometheus text format) and /stats (JSON)."""
    import json

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    path = environ.get("PATH_INFO", "")
    if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
        status, ctype, body = "405 Method Not Allowed", "application/json", \
            b'{"error":"Use GET"}'
    elif path == "/metrics":
        _flush_here()
        status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(_registry())
    elif path == "/stats":
        _flush_here()
        status, ctype, body = "200 OK", "application/json", json.dumps(stats()).encode()
    else:
        status, ctype, body = "404 Not Found", "application/json", \
            b'{"error":"Not found: use /metrics or /stats"}'
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def serve_in_gevent(host, port):
    """Start the listener in this gevent hub (the embedded server); return the server."""
    from gevent.pywsgi import WSGIServer
    server = WSGIServer((host, port), metrics_app, log=None,
                        error_log=logging.getLogger("bunpulse.metrics"))
    server.start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


def serve_in_thread(host, port, retry_for=60.0):
    """Start the listener in a thread (gunicorn's master, which gevent does not patch). After
    `kill -USR2` the old master holds the port until it stops: keep trying meanwhile."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):
            pass

    def run():
        deadline = time.monotonic() + retry_for
        while True:
            try:
                server = make_server(host, port, metrics_app, ThreadingWSGIServer,
                                     handler_class=QuietHandler)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    log.error("metrics: cannot listen on %s:%d: %s", host, port, exc)
                    return
                time.sleep(0.5)
        log.info("metrics on http://%s:%d/metrics", host, port)
        server.serve_forever()

    thread = threading.Thread(target=run, name="bunpulse-metrics", daemon=True)
    thread.start()
    return thread
