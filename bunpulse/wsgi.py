"""The WSGI application (`create_app`): the Pusher WebSocket endpoint and the HTTP API."""
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import WebsocketMismatch

from . import api
from .config import load_settings
from .core import BunPulse
from .transport import SESSION_KEY


def create_app(settings=None, core=None):
    """The WSGI application: the Pusher WebSocket endpoint and the HTTP API."""
    if settings is None:
        settings = core.settings if core is not None else load_settings([])
    core = core if core is not None else BunPulse(settings)
    app = Flask("bunpulse")
    app.extensions["bunpulse"] = core
    # No API body needs more than a full batch of the largest events allowed: refuse bigger
    # ones (413) before reading them, rather than hold them in memory.
    app.config["MAX_CONTENT_LENGTH"] = 256 * 1024 + 2 * max(
        a.max_event_data_size * max(a.max_batch_size, 1) for a in core.apps)
    app.register_blueprint(api.blueprint)

    def serve_socket(environ):
        # Admitted here, so that the socket's long life keeps neither its path nor its query.
        admission = core.admit(api.request_path(environ), api.query_params(environ))
        ws = environ["wsgi.websocket"]

        def session():  # not functools.partial: a call through C deepens the greenlet's C
            core.serve_websocket(ws, admission)  # stack, saved on every switch (+0.6 KiB)

        if SESSION_KEY in environ:
            environ[SESSION_KEY] = session  # our handler runs it after the application returns
        else:
            session()  # another handler: the application blocks for the socket's whole life

    # Every upgrade goes straight to serve_socket (upgrade_shortcut below): Flask's request
    # context and routing were a third of a connect's CPU. The routes stay so that Flask
    # answers plain HTTP there with 426; their view runs only if the shortcut is bypassed.
    @app.route("/app/<path:key>", websocket=True)
    @app.route("/", websocket=True, defaults={"key": None})
    @app.route("/<path:key>", websocket=True)
    def pusher_socket(key):
        serve_socket(request.environ)
        return ""

    flask_wsgi_app = api.publish_shortcut(app.wsgi_app, core, app.config["MAX_CONTENT_LENGTH"])

    def upgrade_shortcut(environ, start_response):
        if environ.get("wsgi.websocket") is not None:
            serve_socket(environ)
            return []
        return flask_wsgi_app(environ, start_response)

    app.wsgi_app = upgrade_shortcut

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if isinstance(exc, WebsocketMismatch):
            if request.path.startswith("/app/"):
                return jsonify(error="This is the Pusher WebSocket endpoint: connect with a "
                                     "WebSocket client"), 426
            return jsonify(error=f"Not found: {request.path}"), 404
        if isinstance(exc, MethodNotAllowed) and not _http_route_exists():
            # Only the WebSocket catch-all matched (POST /foo): the path is unknown.
            return jsonify(error=f"Not found: {request.path}"), 404
        # Keep the exception's headers (Allow on a 405), not its HTML Content-Type.
        return jsonify(error=exc.description), exc.code, [
            h for h in exc.get_headers() if h[0].lower() != "content-type"]

    def _http_route_exists():
        try:
            app.url_map.bind_to_environ(request.environ).match(method="GET", websocket=False)
        except MethodNotAllowed:
            return True
        except HTTPException:
            return False
        return True

    app.on_worker_stop = core.shutdown
    return app
