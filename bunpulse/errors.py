"""Pusher error codes and the exceptions that carry them."""
from enum import IntEnum


class ErrorCode(IntEnum):
    """The Pusher protocol's codes: close codes and `pusher:error` codes (not an exception)."""

    SSL_ONLY = 4000
    APP_NOT_FOUND = 4001
    APP_DISABLED = 4003
    OVER_CONNECTION_QUOTA = 4004
    PATH_NOT_FOUND = 4005
    INVALID_VERSION = 4006
    UNSUPPORTED_PROTOCOL = 4007
    NO_PROTOCOL = 4008
    UNAUTHORIZED = 4009
    OVER_CAPACITY = 4100
    RECONNECT = 4200
    PONG_NOT_RECEIVED = 4201
    CLOSED_AFTER_INACTIVITY = 4202
    CLIENT_EVENT_REJECTED = 4301
    WATCHLIST_LIMIT = 4302


class WsClose:
    """WebSocket close codes of RFC 6455 that the transport uses."""

    NORMAL = 1000
    GOING_AWAY = 1001
    ABNORMAL = 1006  # never sent: the connection ended without a close frame
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    MESSAGE_TOO_BIG = 1009


class ConnectionRefused(Exception):
    """A connection that must get `pusher:error` and then a close with `code`."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = int(code)
        self.message = message


class ClientError(Exception):
    """A bad frame from a client: answered with `pusher:error`, connection kept."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = None if code is None else int(code)
        self.message = message


class SubscriptionError(Exception):
    """A refused subscription: `pusher:subscription_error` plus `pusher:error`."""

    def __init__(self, message, status=401, error_type="AuthError", code=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.code = code


class ApiError(Exception):
    """An HTTP API refusal: the status and a message that says what is wrong."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers  # (name, value) pairs the answer carries (Retry-After on a 429)


class PresenceFull(Exception):
    """An adapter's refusal: a new user would pass the presence channel's member limit."""
