"""The HTTP API: verify the request, call the server core, answer JSON.

Each handler takes the core, an `ApiRequest` and the route's arguments and returns the JSON
payload (or raises ApiError). Every route is declared once, by `@_route`; Flask routes every
call, and the routes declared with `shortcut=True` (the two publish calls, which every trigger
makes) are also served by `shortcut` without Flask's request context and routing, which cost as
much as the publish itself. Both ways give the same answer (`answer`)."""
import logging
import re
from urllib.parse import quote

import orjson
from flask import Blueprint, current_app, request
from werkzeug.http import HTTP_STATUS_CODES

from . import protocol
from .devapp import REFUSED
from .api_query import NonCanonicalQuery, parse_query
from .request import decoded as _decoded, query_params, request_path  # noqa: F401 - api.*
from .errors import ApiError
from .logs import printable
from .protocol import channel_kind
from .rates import EVENTS, READS
from .signatures import bearer_ok, verify_api_request

log = logging.getLogger("bunpulse.api")
blueprint = Blueprint("pusher_api", __name__)

CHANNEL_ATTRIBUTES = frozenset(("user_count", "subscription_count", "cache"))
JSON_HEADER = ("Content-Type", "application/json")


class ApiRequest:
    """What a handler reads of a request, straight from the WSGI environ."""

    __slots__ = ("environ", "method", "path", "max_body", "_body", "_params")

    def __init__(self, environ, max_body, path=None):
        self.environ = environ
        self.method = environ["REQUEST_METHOD"]
        self.path = request_path(environ) if path is None else path
        self.max_body = max_body
        self._body = None
        self._params = None

    @property
    def params(self):
        """The query, parsed once: what the signature covers is what the handlers read. A
        query that could be read two ways is refused (401, as a signature that does not
        match)."""
        if self._params is None:
            try:
                self._params = parse_query(self.environ.get("QUERY_STRING", ""))
            except NonCanonicalQuery as exc:
                raise ApiError(401, str(exc)) from None
        return self._params

    def other_paths(self):
        """The other forms of the path a client may have signed (see verify_api_request): as
        sent, before percent-decoding, and with the prefix that a mount (SCRIPT_NAME, e.g.
        Werkzeug's DispatcherMiddleware) strips from PATH_INFO, as well as without it."""
        environ = self.environ
        prefix = _decoded(environ.get("SCRIPT_NAME", "")).rstrip("/")
        raw = (environ.get("RAW_URI") or environ.get("REQUEST_URI") or "").partition("?")[0]
        if raw:
            yield raw
            if prefix and raw.startswith(prefix + "/"):
                yield raw[len(prefix):]
        else:  # pywsgi keeps no raw path: the percent-encoding clients use (encodeURIComponent)
            yield quote(self.path)
            if prefix:
                yield quote(prefix + self.path)
        if prefix:
            yield prefix + self.path

    def body(self):
        """The body, read once; a body past the bound is refused before it is read."""
        if self._body is None:
            # pywsgi has already answered 400 to a Content-Length that is not a number.
            if int(self.environ.get("CONTENT_LENGTH") or 0) > self.max_body:
                raise self._too_large()
            stream = self.environ.get("wsgi.input")
            try:
                body = stream.read(self.max_body + 1) if stream is not None else b""
            except OSError:  # the client closed early, or sent a broken chunked body
                raise ApiError(400, "Incomplete request body") from None
            if len(body) > self.max_body:  # a chunked body says its size only as it comes
                raise self._too_large()
            self._body = body
        return self._body


    def _too_large(self):
        return ApiError(413, f"Request body is larger than {self.max_body} bytes")


def _json_body(req):
    try:
        body = orjson.loads(req.body() or b"{}")
    except orjson.JSONDecodeError:
        raise ApiError(400, "Malformed JSON body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object")
    return body


def _authenticated_app(core, req, app_id=None):
    """The app a request is for, once its credentials are checked."""
    params = req.params
    if app_id is None:  # the PyPI library's unprefixed terminate path
        app = core.apps.by_key(params.get("auth_key", ""))
        if app is None:
            raise ApiError(401, "Unknown auth_key")
    else:
        app = core.apps.by_id(app_id)
        if app is None:
            raise ApiError(404, f"Unknown app id {app_id}")
    core.hub.app(app.id).api_calls += 1
    authorization = req.environ.get("HTTP_AUTHORIZATION")
    if authorization is not None and authorization.startswith("Bearer "):
        if not bearer_ok(app, authorization):
            raise ApiError(401, "Invalid bearer token: use the app secret")
    else:
        verify_api_request(app, req.method, req.path, params, req.body(),
                           other_paths=req.other_paths())
    if not app.enabled:
        raise ApiError(403, "Application is disabled")
    return app


_RATES = {EVENTS: ("max_backend_events_per_second", "events"),
          READS: ("max_read_requests_per_second", "read requests")}


def _within_rate(core, app, kind, points=1):
    """Count a request against one of the app's HTTP API rates (rates.py): 429 past it."""
    field, what = _RATES[kind]
    limit = getattr(app, field)
    if not limit or core.rates.take(app.id, kind, points, limit):
        return
    core.limits.warning((app.id, field), "app %s passed %s (%d)", app.id, field, limit,
                        app_id=app.id, limit=field)
    if points > limit:  # waiting never lets it through: say so
        message = (f"Too many requests: this request counts {points} {what}, more than the "
                   f"app's {field} ({limit}): send fewer at a time")
    else:
        message = f"Too many requests: the app's {field} is {limit}"
    # The windows are clock seconds: the next begins within a second.
    raise ApiError(429, message, headers=(("Retry-After", "1"),))


def _attributes(raw):
    attributes = [a for a in (raw or "").split(",") if a]
    unknown = set(attributes) - CHANNEL_ATTRIBUTES
    if unknown:
        raise ApiError(400, f"Unknown info attribute: {', '.join(sorted(unknown))}")
    return attributes


def _check_channel(app, name):
    if not protocol.valid_channel_name(name, app.max_channel_name_length):
        raise ApiError(400, f"Invalid channel name {str(name)[:64]!r}: 1 to "
                            f"{app.max_channel_name_length} characters of "
                            "A-Z a-z 0-9 _ - = @ , . ;")


def _event(app, item, where="", allow_many=True):
    """Validate one event of a trigger or batch; return (name, data, channels, socket_id,
    info attributes)."""
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"{where}'name' must be a non-empty string")
    if len(name) > app.max_event_name_length:
        raise ApiError(400, f"{where}Event name is longer than {app.max_event_name_length} "
                            "characters")
    if "data" not in item:
        raise ApiError(400, f"{where}'data' is missing")
    data = protocol.data_string(item["data"])  # an object is serialized once, here
    if len(data.encode()) > app.max_event_data_size:
        raise ApiError(413, f"{where}Event data is larger than {app.max_event_data_size} bytes")
    if allow_many and "channels" in item:
        channels = item["channels"]
        if not isinstance(channels, list) or not channels:
            raise ApiError(400, f"{where}'channels' must be a non-empty list")
        if len(channels) > app.max_channels_per_event:
            raise ApiError(400, f"{where}Too many channels: at most "
                                f"{app.max_channels_per_event} in one event")
    elif "channel" in item:
        channels = [item["channel"]]
    else:
        raise ApiError(400, f"{where}'channel' or 'channels' is missing")
    for channel in channels:
        _check_channel(app, channel)
    socket_id = item.get("socket_id")
    if socket_id is not None and (not isinstance(socket_id, str)
                                  or not protocol.SOCKET_ID_RE.match(socket_id)):
        raise ApiError(400, f"{where}Invalid socket_id")
    info = item.get("info")
    if info is not None and not isinstance(info, str):
        raise ApiError(400, f"{where}'info' must be a comma-separated string")
    attributes = [a for a in _attributes(info) if a != "cache"]
    return name, data, channels, socket_id, attributes


SHORTCUTS = {}  # method -> [(path pattern, handler)]: the routes declared with shortcut=True


def _route(rule, methods=("GET",), shortcut=False, **options):
    """Declare `handler(core, req, **route_args) -> payload (or (status, payload))` as the
    route's view; with
    `shortcut`, `shortcut()` serves it too, without Flask."""
    def register(handler):
        if not hasattr(handler, "flask_view"):  # one view however many rules
            def view(**route_args):
                req = ApiRequest(request.environ, current_app.config["MAX_CONTENT_LENGTH"])
                status, body, headers = answer(handler, _core(), req, route_args)
                return current_app.response_class(body, status=status, headers=headers,
                                                  mimetype="application/json")
            handler.flask_view = view
        blueprint.add_url_rule(rule, handler.__name__, handler.flask_view,
                               methods=list(methods), **options)
        if shortcut:
            for method in methods:
                SHORTCUTS.setdefault(method, []).append((_path_pattern(rule), handler))
        return handler
    return register


def _path_pattern(rule):
    """A werkzeug rule of plain `<name>` parts as a regex on the decoded path, as werkzeug
    matches it."""
    def part(match):
        if ":" in match.group(1):
            raise ValueError(f"a shortcut route takes plain <name> parts only: {rule}")
        return f"(?P<{match.group(1)}>[^/]+)"
    return re.compile(re.sub(r"<([^>]+)>", part, re.escape(rule)) + r"\Z")


def _core():
    return current_app.extensions["bunpulse"].core


def refusal(start_response, error, close=False, headers=()):
    """A WSGI answer for an ApiError raised before any handler ran (a body, a handshake
    refused by the server's driver)."""
    body = orjson.dumps({"error": error.message})
    start_response(f"{error.status} {HTTP_STATUS_CODES[error.status].upper()}",
                   [JSON_HEADER, ("Content-Length", str(len(body))), *headers]
                   + ([("Connection", "close")] if close else []))
    return [body]


def answer(handler, core, req, route_args):
    """Run a handler: (status, JSON body, extra headers). A refusal is its ApiError's answer;
    a bug is logged and answered 500, and the server goes on."""
    headers = ()
    try:
        if "app_id" in route_args and core.dev_app.refuses(req.environ):
            raise ApiError(403, REFUSED)
        payload = handler(core, req, **route_args)
        status, payload = payload if isinstance(payload, tuple) else (200, payload)
    except ApiError as exc:
        status, payload, headers = exc.status, {"error": exc.message}, exc.headers
    except Exception:  # noqa: BLE001 - one bad request must not take the worker down
        log.exception("Error serving %s %s", req.method, printable(req.path))
        status, payload = 500, {"error": "Internal server error"}
    return status, orjson.dumps(payload), headers


@_route("/apps/<app_id>/events", methods=["POST"], shortcut=True)
def trigger(core, req, app_id):
    app = _authenticated_app(core, req, app_id)
    name, data, channels, socket_id, attributes = _event(app, _json_body(req))
    _within_rate(core, app, EVENTS, len(channels))  # soketi's count: one per channel
    core.trigger(app, channels, name, data, socket_id)
    if not attributes:
        return {}
    return {"channels": {c: core.channel_info(app, c, attributes) for c in channels}}


@_route("/apps/<app_id>/batch_events", methods=["POST"], shortcut=True)
def trigger_batch(core, req, app_id):
    app = _authenticated_app(core, req, app_id)
    batch = _json_body(req).get("batch")
    if not isinstance(batch, list):
        raise ApiError(400, "'batch' must be a list of events")
    if len(batch) > app.max_batch_size:
        raise ApiError(400, f"Too many events in a batch: at most {app.max_batch_size}")
    events = []
    for n, item in enumerate(batch):
        if not isinstance(item, dict):
            raise ApiError(400, f"batch[{n}]: each event must be a JSON object")
        events.append(_event(app, item, f"batch[{n}]: ", allow_many=False))
    _within_rate(core, app, EVENTS, len(events))  # one channel each
    for name, data, channels, socket_id, _ in events:
        core.trigger(app, channels, name, data, socket_id)
    if not any(event[4] for event in events):
        return {}
    return {"batch": [core.channel_info(app, channels[0], attributes)
                      for _, _, channels, _, attributes in events]}


@_route("/apps/<app_id>/channels")
def channels(core, req, app_id):
    app = _authenticated_app(core, req, app_id)
    _within_rate(core, app, READS)
    prefix = req.params.get("filter_by_prefix", "")
    attributes = _attributes(req.params.get("info"))
    if "cache" in attributes or "subscription_count" in attributes:
        raise ApiError(400, "Only info=user_count is available when listing channels")
    if "user_count" in attributes and not prefix.startswith("presence-"):
        raise ApiError(400, "info=user_count needs filter_by_prefix=presence-")
    result = {}
    for name, (_, user_count) in core.channel_counts(app).items():
        if name.startswith(prefix):
            result[name] = {"user_count": user_count} if attributes else {}
    return {"channels": result}


@_route("/apps/<app_id>/channels/<path:name>")
def channel(core, req, app_id, name):
    app = _authenticated_app(core, req, app_id)
    _within_rate(core, app, READS)
    _check_channel(app, name)
    attributes = _attributes(req.params.get("info"))
    kind = channel_kind(name)
    if "user_count" in attributes and not kind.presence:
        raise ApiError(400, "info=user_count is only available for presence channels")
    if "cache" in attributes and not kind.cache:
        raise ApiError(400, "info=cache is only available for cache channels")
    subscriptions = core.subscription_count(app, name)
    result = {"occupied": subscriptions > 0}
    result.update(core.channel_info(app, name, attributes))
    if "cache" in attributes:
        cached = core.cached(app, name)
        result["cache"] = None if cached is None else {  # the shape Pusher's API answers with
            "data": cached[1], "ttl": max(0, int(cached[2]))}
    return result


@_route("/apps/<app_id>/channels/<path:name>/users")
def channel_users(core, req, app_id, name):
    app = _authenticated_app(core, req, app_id)
    _within_rate(core, app, READS)
    _check_channel(app, name)
    if not channel_kind(name).presence:
        raise ApiError(400, "Users are only available for presence channels")
    return {"users": [{"id": user_id} for user_id in core.members(app, name)]}


@_route("/apps/<app_id>/users/<user_id>/terminate_connections", methods=["POST"])
@_route("/users/<user_id>/terminate_connections", methods=["POST"], defaults={"app_id": None})
def terminate_connections(core, req, user_id, app_id):
    app = _authenticated_app(core, req, app_id)
    _json_body(req)
    core.terminate_user(app, user_id)
    return {}


@_route("/health")
def health(core, req):
    """Alive: 200 while serving, 503 once the worker is stopping."""
    if core.stopping:
        return 503, {"ok": False, "status": "stopping"}
    return {"ok": True, "status": "alive"}


@_route("/ready")
def ready(core, req):
    """Ready for new connections: not stopping, and Redis reachable when configured."""
    redis = core.redis_state()
    if core.stopping:
        return 503, {"ready": False, "reason": "stopping", "redis": redis}
    if redis == "down":
        return 503, {"ready": False, "reason": "redis unreachable", "redis": redis}
    return {"ready": True, "redis": redis}


# ------------------------------------------------------------- the shortcut

def shortcut(core, max_body):
    """`serve(environ, start_response)`: the answer of a route declared with shortcut=True,
    or None for any other request (left to Flask)."""
    def serve(environ, start_response):
        routes = SHORTCUTS.get(environ["REQUEST_METHOD"])
        if routes is None:
            return None
        path = request_path(environ)
        for pattern, handler in routes:
            match = pattern.match(path)
            if match is not None:
                req = ApiRequest(environ, max_body, path)
                status, body, headers = answer(handler, core, req, match.groupdict())
                start_response(f"{status} {HTTP_STATUS_CODES[status].upper()}",  # as werkzeug
                               [JSON_HEADER, ("Content-Length", str(len(body))), *headers])
                return [body]
        return None
    return serve
