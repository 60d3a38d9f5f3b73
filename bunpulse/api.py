"""The HTTP API blueprint: verify the request, call the server core, answer JSON."""
from urllib.parse import unquote_plus

import orjson
from flask import Blueprint, current_app, request

from . import protocol
from .errors import ApiError
from .protocol import channel_kind
from .signatures import bearer_ok, verify_api_request

blueprint = Blueprint("pusher_api", __name__)

CHANNEL_ATTRIBUTES = frozenset(("user_count", "subscription_count", "cache"))


def _core():
    return current_app.extensions["bunpulse"]


def _json(payload, status=200):
    return current_app.response_class(orjson.dumps(payload), status=status,
                                      mimetype="application/json")


@blueprint.errorhandler(ApiError)
def _api_error(exc):
    return _json({"error": exc.message}, exc.status)


def _query(environ):
    """The query string as a dict of first values: the signature's parameters are plain ASCII,
    and werkzeug's MultiDict parse costs more than checking the HMAC."""
    params = {}
    for part in environ.get("QUERY_STRING", "").split("&"):
        if part:
            key, _, value = part.partition("=")
            if "%" in part or "+" in part or not part.isascii():
                key, value = (unquote_plus(x.encode("latin-1").decode("utf-8", "replace"))
                              for x in (key, value))
            params.setdefault(key, value)
    return params


def _authenticated_app(app_id=None):
    """The app a request is for, once its credentials are checked."""
    req = request._get_current_object()  # one context lookup, not one per attribute
    core = _core()
    params = _query(req.environ)
    if app_id is None:  # the PyPI library's unprefixed terminate path
        app = core.apps.by_key(params.get("auth_key", ""))
        if app is None:
            raise ApiError(401, "Unknown auth_key")
    else:
        app = core.apps.by_id(app_id)
        if app is None:
            raise ApiError(404, f"Unknown app id {app_id}")
    environ = req.environ
    authorization = environ.get("HTTP_AUTHORIZATION")
    if authorization is not None and authorization.startswith("Bearer "):
        if not bearer_ok(app, authorization):
            raise ApiError(401, "Invalid bearer token: use the app secret")
    else:
        verify_api_request(app, req.method, req.path, params, req.get_data(cache=True),
                           raw_path=environ.get("RAW_URI", "").partition("?")[0])
    if not app.enabled:
        raise ApiError(403, "Application is disabled")
    return app


def _body():
    raw = request.get_data(cache=True)
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError:
        raise ApiError(400, "Malformed JSON body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object")
    return body


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


@blueprint.post("/apps/<app_id>/events")
def trigger(app_id):
    app = _authenticated_app(app_id)
    name, data, channels, socket_id, attributes = _event(app, _body())
    core = _core()
    core.trigger(app, channels, name, data, socket_id)
    if not attributes:
        return _json({})
    return _json({"channels": {c: core.channel_info(app, c, attributes) for c in channels}})


@blueprint.post("/apps/<app_id>/batch_events")
def trigger_batch(app_id):
    app = _authenticated_app(app_id)
    batch = _body().get("batch")
    if not isinstance(batch, list):
        raise ApiError(400, "'batch' must be a list of events")
    if len(batch) > app.max_batch_size:
        raise ApiError(400, f"Too many events in a batch: at most {app.max_batch_size}")
    events = []
    for n, item in enumerate(batch):
        if not isinstance(item, dict):
            raise ApiError(400, f"batch[{n}]: each event must be a JSON object")
        events.append(_event(app, item, f"batch[{n}]: ", allow_many=False))
    core = _core()
    for name, data, channels, socket_id, _ in events:
        core.trigger(app, channels, name, data, socket_id)
    if not any(event[4] for event in events):
        return _json({})
    return _json({"batch": [core.channel_info(app, channels[0], attributes)
                            for _, _, channels, _, attributes in events]})


@blueprint.get("/apps/<app_id>/channels")
def channels(app_id):
    app = _authenticated_app(app_id)
    prefix = request.args.get("filter_by_prefix", "")
    attributes = _attributes(request.args.get("info"))
    if "cache" in attributes or "subscription_count" in attributes:
        raise ApiError(400, "Only info=user_count is available when listing channels")
    if "user_count" in attributes and not prefix.startswith("presence-"):
        raise ApiError(400, "info=user_count needs filter_by_prefix=presence-")
    result = {}
    for name, (_, user_count) in _core().adapter.channel_counts(app.id).items():
        if name.startswith(prefix):
            result[name] = {"user_count": user_count} if attributes else {}
    return _json({"channels": result})


@blueprint.get("/apps/<app_id>/channels/<path:name>")
def channel(app_id, name):
    app = _authenticated_app(app_id)
    _check_channel(app, name)
    attributes = _attributes(request.args.get("info"))
    kind = channel_kind(name)
    if "user_count" in attributes and not kind.presence:
        raise ApiError(400, "info=user_count is only available for presence channels")
    if "cache" in attributes and not kind.cache:
        raise ApiError(400, "info=cache is only available for cache channels")
    core = _core()
    subscriptions = core.adapter.subscription_count(app.id, name)
    result = {"occupied": subscriptions > 0}
    result.update(core.channel_info(app, name, attributes))
    if "cache" in attributes:
        cached = core.adapter.cache_get(app.id, name)
        result["cache"] = None if cached is None else {  # the reference's shape exactly
            "data": cached[1], "ttl": max(0, int(cached[2]))}
    return _json(result)


@blueprint.get("/apps/<app_id>/channels/<path:name>/users")
def channel_users(app_id, name):
    app = _authenticated_app(app_id)
    _check_channel(app, name)
    if not channel_kind(name).presence:
        raise ApiError(400, "Users are only available for presence channels")
    members = _core().adapter.members(app.id, name)
    return _json({"users": [{"id": user_id} for user_id in members]})


@blueprint.post("/apps/<app_id>/users/<user_id>/terminate_connections")
@blueprint.post("/users/<user_id>/terminate_connections", defaults={"app_id": None})
def terminate_connections(user_id, app_id):
    app = _authenticated_app(app_id)
    _body()
    _core().terminate_user(app, user_id)
    return _json({})


@blueprint.get("/health")
def health():
    return _json({"ok": True})


@blueprint.get("/stats")
def stats():
    """This worker's counters (each gunicorn worker answers for itself); no secrets."""
    core = _core()
    return _json({"webhooks": core.webhooks.stats.as_dict(), "evictions": core.evictions})
