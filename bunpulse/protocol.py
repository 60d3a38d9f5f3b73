"""The Pusher wire protocol as pure functions and data: no I/O, no gevent, Flask or redis.

Server-to-client frames are returned as UTF-8 JSON bytes, ready to be framed once and sent to
many sockets. Channel events carry `data` as a JSON string (Pusher's double encoding).
"""
import re

import orjson

from .errors import ClientError

PROTOCOL_VERSIONS = frozenset((5, 6, 7))
# \Z, not $: $ also matches before a trailing newline ("a\n" is no channel name).
SOCKET_ID_RE = re.compile(r"^[0-9]+\.[0-9]+\Z")
CHANNEL_NAME_RE = re.compile(r"^[A-Za-z0-9_\-=@,.;]+\Z")
USER_CHANNEL_PREFIX = "#server-to-user-"
MAX_CHANNEL_NAME = 200
MAX_USER_INFO_BYTES = 1024  # Pusher's; an app's max_presence_member_size_in_kb changes it
MAX_USER_ID_LENGTH = 128
MAX_WATCHLIST = 100

dumps = orjson.dumps


def loads(raw):
    return orjson.loads(raw)


def data_string(data):
    """Event data as the JSON string that travels in frames and webhooks."""
    return data if isinstance(data, str) else orjson.dumps(data).decode()


# ---------------------------------------------------------------- channels

class ChannelKind:
    """What a channel's prefix says about it."""

    __slots__ = ("private", "presence", "encrypted", "cache", "user")

    def __init__(self, name):
        self.user = name.startswith(USER_CHANNEL_PREFIX)
        self.presence = name.startswith(("presence-", "presence-cache-"))
        self.encrypted = name.startswith("private-encrypted-")
        self.private = self.presence or name.startswith("private-")
        self.cache = name.startswith(("cache-", "private-cache-", "private-encrypted-cache-",
                                      "presence-cache-"))

    @property
    def client_events_allowed(self):
        return self.private and not self.encrypted


# The kind depends on the prefix alone: one shared instance per prefix, longest first. Not a
# cache keyed by name, which would keep the names a client made up after it left.
_KINDS = tuple((prefix, ChannelKind(prefix)) for prefix in (
    "private-encrypted-cache-", "private-encrypted-", "private-cache-", "presence-cache-",
    "private-", "presence-", "cache-", USER_CHANNEL_PREFIX))
_PUBLIC = ChannelKind("")
_KIND_INITIALS = frozenset(prefix[0] for prefix, _ in _KINDS)


def channel_kind(name):
    if name[:1] in _KIND_INITIALS:
        for prefix, kind in _KINDS:
            if name.startswith(prefix):
                return kind
    return _PUBLIC


def valid_channel_name(name, max_length=MAX_CHANNEL_NAME):
    if not isinstance(name, str) or not 0 < len(name) <= max_length:
        return False
    if name.startswith(USER_CHANNEL_PREFIX):
        return len(name) > len(USER_CHANNEL_PREFIX) and CHANNEL_NAME_RE.match(
            name[len(USER_CHANNEL_PREFIX):]) is not None
    return CHANNEL_NAME_RE.match(name) is not None


def user_channel(user_id):
    return USER_CHANNEL_PREFIX + user_id


# ---------------------------------------------------------------- client frames

class ClientFrame:
    __slots__ = ("event", "data", "channel")

    def __init__(self, event, data, channel):
        self.event = event
        self.data = data
        self.channel = channel


def parse_client_frame(text):
    """Decode one client message; a malformed one raises ClientError."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ClientError("Invalid JSON: the message could not be parsed") from None
    if not isinstance(message, dict):
        raise ClientError("Invalid message: a JSON object was expected")
    event = message.get("event")
    if not isinstance(event, str) or not event:
        raise ClientError("Invalid message: 'event' must be a non-empty string")
    channel = message.get("channel")
    if channel is not None and not isinstance(channel, str):
        raise ClientError("Invalid message: 'channel' must be a string")
    data = message.get("data")
    if isinstance(data, str) and event.startswith("pusher:"):
        # Some clients double-encode their own data; accept both forms.
        try:
            data = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return ClientFrame(event, data, channel)


def parse_presence_data(channel_data, max_info_bytes=MAX_USER_INFO_BYTES):
    """Validate presence channel_data; return (user_id, user_info) or raise ValueError."""
    if not isinstance(channel_data, str):
        raise ValueError("channel_data must be a JSON string")
    try:
        member = orjson.loads(channel_data)
    except orjson.JSONDecodeError:
        raise ValueError("channel_data is not valid JSON") from None
    if not isinstance(member, dict) or "user_id" not in member:
        raise ValueError("channel_data must be an object with a user_id")
    user_id = member["user_id"]
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int, float)):
        raise ValueError("user_id must be a string or a number")
    user_id = user_id if isinstance(user_id, str) else orjson.dumps(user_id).decode()
    if not user_id:
        raise ValueError("user_id must not be empty")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise ValueError(f"user_id is longer than {MAX_USER_ID_LENGTH} characters")
    user_info = member.get("user_info")
    check_user_info(user_info, max_info_bytes)
    return user_id, user_info


def check_user_info(user_info, max_info_bytes=MAX_USER_INFO_BYTES):
    """A presence member's user_info as JSON fits in max_info_bytes, or ValueError."""
    if user_info is not None and len(orjson.dumps(user_info)) > max_info_bytes:
        raise ValueError(f"user_info is larger than {max_info_bytes} bytes")


def parse_user_data(user_data):
    """Validate signin user_data; return the decoded object or raise ValueError."""
    if not isinstance(user_data, str):
        raise ValueError("user_data must be a JSON string")
    try:
        user = orjson.loads(user_data)
    except orjson.JSONDecodeError:
        raise ValueError("user_data is not valid JSON") from None
    if not isinstance(user, dict):
        raise ValueError("user_data must be a JSON object")
    user_id = user.get("id")
    if not isinstance(user_id, str) or not user_id:
        raise ValueError("user_data.id must be a non-empty string")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise ValueError(f"user_data.id is longer than {MAX_USER_ID_LENGTH} characters")
    watchlist = user.get("watchlist")
    if watchlist is not None and (not isinstance(watchlist, list)
                                  or not all(isinstance(w, str) for w in watchlist)):
        raise ValueError("user_data.watchlist must be a list of strings")
    return user


# ---------------------------------------------------------------- server frames

PING = b'{"event":"pusher:ping","data":"{}"}'
PONG = b'{"event":"pusher:pong","data":"{}"}'


def connection_established(socket_id, activity_timeout):
    return dumps({"event": "pusher:connection_established",
                  "data": dumps({"socket_id": socket_id,
                                 "activity_timeout": activity_timeout}).decode()})


def error(code, message):
    return dumps({"event": "pusher:error", "data": {"code": code, "message": message}})


def event(name, channel, data, user_id=None):
    """A channel event; `data` is sent as a string, or as given when it is an object from a
    client event (pusher-js sends objects and relays them as they came)."""
    frame = {"event": name, "channel": channel, "data": data}
    if user_id is not None:
        frame["user_id"] = user_id
    return dumps(frame)


def subscription_succeeded(channel, presence=None):
    data = "{}" if presence is None else dumps({"presence": presence}).decode()
    return dumps({"event": "pusher_internal:subscription_succeeded", "channel": channel,
                  "data": data})


def presence_roster(members):
    """The `presence` object of subscription_succeeded from {user_id: user_info}."""
    return {"ids": list(members), "hash": members, "count": len(members)}


def subscription_error(channel, message, status=401, error_type="AuthError"):
    return dumps({"event": "pusher:subscription_error", "channel": channel,
                  "data": {"type": error_type, "error": message, "status": status}})


def member_added(channel, user_id, user_info):
    return event("pusher_internal:member_added", channel,
                 dumps({"user_id": user_id, "user_info": user_info}).decode())


def member_removed(channel, user_id):
    return event("pusher_internal:member_removed", channel, dumps({"user_id": user_id}).decode())


def subscription_count(channel, count):
    # data a JSON string, as every channel event's: pusher-js parses it into event.data
    return event("pusher_internal:subscription_count", channel,
                 dumps({"subscription_count": count}).decode())


def cache_miss(channel):
    return dumps({"event": "pusher:cache_miss", "channel": channel})


def signin_success(user_data):
    return dumps({"event": "pusher:signin_success", "data": {"user_data": user_data}})


def watchlist_events(events):
    """events: [(name, [user_ids])] with name 'online' or 'offline'."""
    return dumps({"event": "pusher_internal:watchlist_events",
                  "data": {"events": [{"name": n, "user_ids": ids} for n, ids in events]}})
