"""Answers to pusher-js's authorization requests, for an application that hosts BunPulse:
channel authorization (private, presence, `private-encrypted-`) and user authentication
(`pusher:signin`), signed in-process with the app's secret. The host application says who the
user is; everything else is here.

`Authorizer.answer(fields, user)` is the framework-free core (fields: the form pusher-js POSTs);
`auth_blueprint` wires it into Flask at pusher-js's default endpoints."""
import base64
import binascii
import hashlib
import logging

import orjson

from . import protocol
from .signatures import channel_auth, user_auth

log = logging.getLogger("bunpulse")

NO_RULE = ("No allow rule: private channels are refused (pass allow=lambda user, channel: ... "
           "to say who may join which)")


class Authorizer:
    """Signs what pusher-js asks for, for one app (anything with `key` and `secret`).

    `encryption_master_key`: the base64 of the 32-byte key the host application encrypts with
    (as the official libraries' `encryption_master_key_base64`); without it `private-encrypted-`
    channels are refused. `allow(user, channel_name)`: which signed-in user may join which
    private, encrypted or presence channel. Without it private and encrypted channels are
    refused (a signed-in user would otherwise join `private-user-<anyone>` and get every
    encrypted channel's shared secret) and presence channels admit every signed-in user as
    themselves."""

    def __init__(self, app, encryption_master_key=None, allow=None):
        self.app = app
        self.allow = allow
        if allow is None:
            log.warning("bunpulse.authorizer: no allow rule given: private- and "
                        "private-encrypted- channels are refused (403); presence channels "
                        "admit every signed-in user")
        self._master_key = None
        if encryption_master_key is not None:
            try:
                key = base64.b64decode(encryption_master_key, validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if len(key) != 32:
                raise ValueError("encryption_master_key must be the base64 of 32 bytes")
            self._master_key = key

    def answer(self, fields, user):
        """(HTTP status, JSON payload) for one request: a channel authorization when the fields
        name a channel (`socket_id`, `channel_name`), else a user authentication (`socket_id`).
        `user`: None when nobody is signed in, a user id, or a dict with "id" and optionally
        "user_info" and "watchlist"."""
        socket_id = fields.get("socket_id")
        if not isinstance(socket_id, str) or not protocol.SOCKET_ID_RE.match(socket_id):
            return 400, {"error": "Invalid socket_id"}
        user = _user_record(user)
        if "channel_name" in fields:
            return self._channel(socket_id, fields.get("channel_name"), user)
        if user is None:
            return 403, {"error": "Not signed in"}
        user_data = orjson.dumps(user).decode()
        return 200, {"auth": user_auth(self.app, socket_id, user_data), "user_data": user_data}

    def _channel(self, socket_id, channel, user):
        if not protocol.valid_channel_name(channel):
            return 400, {"error": "Invalid channel_name"}
        kind = protocol.channel_kind(channel)
        if not kind.private or kind.user:
            return 400, {"error": "Only private- and presence- channels need authorization"}
        if user is None:
            return 403, {"error": "Not signed in"}
        if self.allow is None:
            if not kind.presence:
                return 403, {"error": NO_RULE}
        elif not self.allow(user, channel):
            return 403, {"error": f"Not allowed to join {channel}"}
        if kind.encrypted and self._master_key is None:
            return 403, {"error": "Encrypted channels need the host application's "
                                  "encryption_master_key"}
        payload = {}
        channel_data = None
        if kind.presence:
            member = {"user_id": user["id"]}
            if "user_info" in user:
                member["user_info"] = user["user_info"]
            channel_data = payload["channel_data"] = orjson.dumps(member).decode()
        payload["auth"] = channel_auth(self.app, socket_id, channel, channel_data)
        if kind.encrypted:
            payload["shared_secret"] = base64.b64encode(hashlib.sha256(
                channel.encode() + self._master_key).digest()).decode()
        return 200, payload


def _user_record(user):
    """The host application's user as the protocol carries it: {"id": str, ...}."""
    if user is None:
        return None
    record = dict(user) if isinstance(user, dict) else {"id": user}
    user_id = record.get("id")
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int)) or user_id == "":
        raise ValueError(f"the user must have an id (a non-empty string or number), got "
                         f"{user_id!r}")
    record["id"] = str(user_id)
    if len(record["id"]) > protocol.MAX_USER_ID_LENGTH:
        raise ValueError(f"user id longer than {protocol.MAX_USER_ID_LENGTH} characters")
    return record


def auth_blueprint(app, identify, encryption_master_key=None, allow=None, name="pusher_auth"):
    """A Flask blueprint answering pusher-js at its default endpoints, `POST /pusher/auth`
    (channels) and `POST /pusher/user-auth` (signin); register it with another `url_prefix`
    to move them. `identify(request)` returns the signed-in user (see Authorizer.answer) or
    None. `app`: the BunPulse app to sign for (see signing_app)."""
    from flask import Blueprint, jsonify, request

    authorizer = Authorizer(signing_app(app), encryption_master_key, allow)
    blueprint = Blueprint(name, __name__, url_prefix="/pusher")

    def view():
        status, payload = authorizer.answer(request.form, identify(request))
        return jsonify(payload), status

    blueprint.add_url_rule("/auth", "channel", view, methods=["POST"])
    blueprint.add_url_rule("/user-auth", "user", view, methods=["POST"])
    return blueprint


def signing_app(source, app_id=None):
    """The app record to sign with: `source` is one already (key, secret), or a BunPulse WSGI
    app, server or core, whose first app (or `app_id`) is taken."""
    if hasattr(source, "key") and hasattr(source, "secret"):
        return source
    holder = getattr(source, "extensions", {}).get("bunpulse") or source  # its ServerContext
    core = getattr(holder, "core", holder)
    apps = core.apps
    app = next(iter(apps)) if app_id is None else apps.by_id(app_id)
    if app is None:
        raise ValueError(f"no app with id {app_id}")
    return app
