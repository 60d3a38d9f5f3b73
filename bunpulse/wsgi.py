"""The WSGI application (`create_app`): the Pusher WebSocket endpoint and the HTTP API.

Each route is declared once: the HTTP API's in api.py, the WebSocket endpoint here. Two kinds
of request skip Flask's request context and routing, which cost as much as the work itself:
every WebSocket upgrade (whatever its path: `BunPulse.admit` refuses a wrong one with 4005),
and the routes api.py declares with `shortcut=True` (the publish calls).

Whoever serves it: under gevent (BunPulse's worker and embedded server, gunicorn's stock
gevent-websocket worker) requests run in the hub's greenlets, and an upgrade arrives as
BunPulse's WebSocket or as the stock handler's, whose socket is taken over
(serving/stock_worker.py); in a process gevent does not patch (`flask run`), requests are
handed to a hub thread (serving/flask_run.py). Either way the connection is served by
websocket.serve_upgraded, and every driver finds the settings in the one ServerContext
(context.py), kept in `extensions["bunpulse"]`."""
import logging
import sys

import gevent
from flask import Flask, jsonify, request
from gevent import monkey
from werkzeug.exceptions import HTTPException, NotFound

from . import api
from .config import ConfigError, check_processes, load_settings
from .context import ServerContext, register
from .core import BunPulse
from .startup import gunicorn_workers
from .errors import ApiError
from .metrics import instrument
from .serving.flask_run import ThreadedDispatch, arm_werkzeug_head_deadline
from .serving.stock_worker import (arm_head_deadline, note_stock_handler, serve_stock_websocket,
                                   stock_request)
from .websocket import PusherWebSocket, serve_upgraded

WEBSOCKET_ROUTE = "/app/<path:key>"
WORKER_BOOT_ERROR = 3  # gunicorn's Arbiter.WORKER_BOOT_ERROR: its master stops, not respawns
log = logging.getLogger("bunpulse")


def create_app(settings=None, core=None):
    """The WSGI application: the Pusher WebSocket endpoint and the HTTP API."""
    if settings is None:
        settings = core.settings if core is not None else load_settings([])
    workers = gunicorn_workers()
    if workers is not None:  # gunicorn loads it: -w 2 on the local adapter would lose events
        try:
            check_processes(settings, workers, "gunicorn's -w or WEB_CONCURRENCY")
        except ConfigError as exc:
            log.error("bunpulse: configuration error: %s", exc)
            sys.exit(WORKER_BOOT_ERROR)
    core = core if core is not None else BunPulse(settings)
    flask_app = Flask("bunpulse")
    # A doubled slash is a bad path, answered in JSON like any other (404, or 400 for a channel
    # name), not a redirect with an HTML body (found by tests/test_fuzz.py).
    flask_app.url_map.merge_slashes = False
    # No API body needs more than a full batch of the largest events allowed: refuse bigger
    # ones (413) before reading them, rather than hold them in memory.
    max_body = 256 * 1024 + 2 * max(
        app.max_event_data_size * max(app.max_batch_size, 1) for app in core.apps)
    flask_app.config["MAX_CONTENT_LENGTH"] = max_body
    flask_app.register_blueprint(api.blueprint)
    if settings.dashboard:
        from .dashboard import install_dashboard  # imported only when enabled
        install_dashboard(flask_app, core)
    # Upgrades never reach Flask (see dispatch): this view answers plain HTTP only.
    flask_app.add_url_rule(WEBSOCKET_ROUTE, "websocket_endpoint", _websocket_endpoint)
    flask_app.register_error_handler(HTTPException, _http_error)

    flask_wsgi_app = flask_app.wsgi_app
    shortcut = api.shortcut(core, max_body)

    under_stock = monkey.is_module_patched("socket") and _under_the_stock_worker()

    def http(environ, start_response):
        if under_stock:
            try:
                stock_request(context, environ)
            except ApiError as exc:  # where a next request would start is not known: close
                return api.refusal(start_response, exc, close=True)
            except gevent.Timeout:
                return api.refusal(start_response, ApiError(408, "Request body not complete "
                                                                 "in time"), close=True)
        answer = shortcut(environ, start_response)
        if answer is not None:
            return answer
        return flask_wsgi_app(environ, start_response)

    http = instrument(http, core.metrics, settings.access_log)
    shortcut_only = instrument(shortcut, core.metrics, settings.access_log)

    def fast_answer(environ, start_response):
        # The publish calls, answered by the handler without pywsgi (see transport), counted
        # and logged like every other request; None for any other request.
        if not _is_shortcut(environ):
            return None
        return shortcut_only(environ, start_response)

    if shortcut_only is shortcut:  # nothing counts or logs requests: no need to look first
        fast_answer = shortcut

    def dispatch(environ, start_response):
        ws = environ.get("wsgi.websocket")
        if ws is not None:
            if type(ws) is PusherWebSocket:
                serve_upgraded(context, ws, environ)  # returns at once: the loop reads it
            else:
                serve_stock_websocket(context, environ)
            return []
        return http(environ, start_response)

    context = ServerContext(settings, core, max_body, fast_answer, _call_here)
    if monkey.is_module_patched("socket"):
        core.metrics.start_flushing()  # in the hub that serves: create_app runs there
        flask_app.wsgi_app = dispatch
        if under_stock:
            note_stock_handler()
            arm_head_deadline(context)
    else:  # threads, not greenlets, may serve it (flask run): see serving/flask_run.py
        if settings.redis_url:
            raise ConfigError("redis_url needs a gevent-patched process (gunicorn's gevent "
                              "workers, python -m bunpulse): redis-py would block BunPulse's "
                              "hub otherwise")
        flask_app.wsgi_app = ThreadedDispatch(dispatch, context)
        context.call = flask_app.wsgi_app.call
        arm_werkzeug_head_deadline(context)
    context.application = flask_app
    flask_app.extensions["bunpulse"] = context
    register(context)
    # Host applications written for 0.1 copied this line; nothing reads it any more (the
    # gunicorn worker finds the context itself). Removed in 1.0.
    flask_app.on_worker_stop = context.stop
    return flask_app


def publish(realtime, channels, event, data, socket_id=None, app_id=None):
    """Publish an event from the application that hosts BunPulse, in-process (no HTTP): to
    the clients of this process and, with Redis, of every worker and node. `realtime`: what
    create_app returned; `channels`: a name or a list; `data`: a string, sent as is, or any
    JSON value; `app_id`: the app, when there are several."""
    context = realtime.extensions["bunpulse"]
    core = context.core
    app = next(iter(core.apps)) if app_id is None else core.apps.by_id(str(app_id))
    if app is None:
        raise ValueError(f"no app with id {app_id}")
    channels = [channels] if isinstance(channels, str) else list(channels)
    context.call(core.trigger, app, channels, event, data, socket_id)


def _call_here(func, *args):
    return func(*args)


def _under_the_stock_worker():
    """gunicorn imported gevent-websocket's worker to run this process, not BunPulse's."""
    return "geventwebsocket.gunicorn.workers" in sys.modules and \
        "bunpulse.worker" not in sys.modules


def _is_shortcut(environ):
    path = api.request_path(environ)
    return any(pattern.match(path) for pattern, _ in api.SHORTCUTS.get(
        environ["REQUEST_METHOD"], ()))


def _websocket_endpoint(key):
    return jsonify(error="This is the Pusher WebSocket endpoint: connect with a WebSocket "
                         "client"), 426


def _http_error(exc):
    if isinstance(exc, NotFound):
        return jsonify(error=f"Not found: {request.path}"), 404
    # Keep the exception's headers (Allow on a 405), not its HTML Content-Type.
    return jsonify(error=exc.description), exc.code, [
        h for h in exc.get_headers() if h[0].lower() != "content-type"]
