"""Every HMAC of the Pusher protocol, checked in constant time. No I/O."""
import hashlib
import hmac
import itertools
import time

from .api_query import string_to_sign
from .errors import ApiError

AUTH_TIMESTAMP_GRACE = 600


def sign(secret, message):
    return hmac.digest(secret.encode(), message.encode(), "sha256").hex()  # one C call


def _auth_matches(app, auth, message):
    """`auth` is "key:signature": verified with the secret of the pair that key names."""
    if not isinstance(auth, str) or ":" not in auth:
        return False
    key, _, signature = auth.partition(":")
    secret = app.secret_for(key)
    if secret is None:
        return False
    return hmac.compare_digest(signature.encode(), sign(secret, message).encode())


def channel_auth_ok(app, socket_id, channel, auth, channel_data=None):
    """Private and encrypted channels sign `socket_id:channel`; presence channels append the
    channel_data string exactly as received."""
    message = f"{socket_id}:{channel}" if channel_data is None else \
        f"{socket_id}:{channel}:{channel_data}"
    return _auth_matches(app, auth, message)


def user_auth_ok(app, socket_id, user_data, auth):
    return _auth_matches(app, auth, f"{socket_id}::user::{user_data}")


def channel_auth(app, socket_id, channel, channel_data=None, pair=None):
    """The auth string a backend would hand out (used by tests and the benchmark tools);
    signed with `pair` (a KeyPair), the app's primary pair by default."""
    message = f"{socket_id}:{channel}" if channel_data is None else \
        f"{socket_id}:{channel}:{channel_data}"
    pair = pair or app.pairs[0]
    return f"{pair.key}:{sign(pair.secret, message)}"


def user_auth(app, socket_id, user_data, pair=None):
    pair = pair or app.pairs[0]
    return f"{pair.key}:{sign(pair.secret, f'{socket_id}::user::{user_data}')}"


# ---------------------------------------------------------------- HTTP API

def api_string_to_sign(method, path, params):
    return f"{method.upper()}\n{path}\n{string_to_sign(params)}"


def sign_api_request(secret, method, path, params):
    return sign(secret, api_string_to_sign(method, path, params))


def verify_api_request(app, method, path, params, body, now=None, other_paths=()):
    """Check a signed HTTP API request; raise ApiError(401) saying what is wrong.
    `other_paths`: other forms of `path` the client may have signed, tried in turn only if
    `path` fails (libraries sign what they send: some percent-encode a channel name, and a
    client of a mounted server signs the mount's prefix or not). The signature is checked with
    the secret of the pair that auth_key names (any active pair of the app)."""
    secret = app.secret_for(params.get("auth_key"))
    if secret is None:
        raise ApiError(401, "Unknown auth_key")
    signature = params.get("auth_signature")
    if not signature:
        raise ApiError(401, "Missing auth_signature")
    timestamp = params.get("auth_timestamp", "")
    try:
        skew = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        raise ApiError(401, "Missing or invalid auth_timestamp") from None
    if skew > AUTH_TIMESTAMP_GRACE:
        raise ApiError(401, f"Timestamp expired: auth_timestamp must be within "
                            f"{AUTH_TIMESTAMP_GRACE} seconds of the server time")
    if params.get("auth_version", "1.0") != "1.0":
        raise ApiError(401, "Unsupported auth_version (expected 1.0)")
    signature = signature.encode()
    if not any(hmac.compare_digest(signature,
                                   sign_api_request(secret, method, p, params).encode())
               for p in itertools.chain((path,), other_paths)):
        raise ApiError(401, "Invalid signature: you should have sent the HMAC-SHA256 hex digest "
                            "of the method, path and sorted query, signed with the app secret")
    body_md5 = params.get("body_md5")
    if body:
        if body_md5 is None:
            raise ApiError(401, "Missing body_md5 for a request with a body")
        if not hmac.compare_digest(body_md5.encode(), hashlib.md5(body).hexdigest().encode()):
            raise ApiError(401, "body_md5 does not match the request body")
    elif body_md5 is not None and body_md5 != hashlib.md5(b"").hexdigest():
        raise ApiError(401, "body_md5 does not match the request body")


def bearer_ok(app, authorization):
    """`Authorization: Bearer <app secret>`, any active pair's secret; the key is public and
    never a credential. Every secret is compared, so that the time says not which matched."""
    if not authorization or not authorization.startswith("Bearer "):
        return False
    token = authorization[7:].strip().encode()
    matched = False
    for pair in app.pairs:
        matched |= hmac.compare_digest(token, pair.secret.encode())
    return matched


# ---------------------------------------------------------------- webhooks

def webhook_signature(secret, body):
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
