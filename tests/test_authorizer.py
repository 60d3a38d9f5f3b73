"""The authorization helper for host applications (bunpulse.authorizer): its answers are what
the official PyPI library would sign, and what BunPulse accepts; bad requests get 400, anonymous
or refused users 403. pusher-js drives it end to end in tests/test_hosting.py."""
import json

import pusher
import pytest
from flask import Flask

from bunpulse.apps import App
from bunpulse.authorizer import Authorizer, auth_blueprint
from bunpulse.signatures import channel_auth_ok, user_auth_ok
from conftest import APP_ID, KEY, MASTER_KEY, SECRET

APP = App(id=APP_ID, key=KEY, secret=SECRET)
LIBRARY = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET,
                        encryption_master_key_base64=MASTER_KEY)
SOCKET = "123.456"
ALICE = {"id": 7, "user_info": {"name": "Alice"}}


def answer(fields, user=ALICE, **options):
    return Authorizer(APP, encryption_master_key=MASTER_KEY, **options).answer(fields, user)


def test_private_channel_is_signed_as_the_library_signs_it():
    status, payload = answer({"socket_id": SOCKET, "channel_name": "private-a"})
    assert status == 200
    assert payload == LIBRARY.authenticate("private-a", SOCKET)


def test_presence_channel_carries_the_host_user():
    status, payload = answer({"socket_id": SOCKET, "channel_name": "presence-a"})
    assert status == 200
    assert json.loads(payload["channel_data"]) == {"user_id": "7", "user_info": {"name": "Alice"}}
    assert channel_auth_ok(APP, SOCKET, "presence-a", payload["auth"], payload["channel_data"])
    status, payload = answer({"socket_id": SOCKET, "channel_name": "presence-a"}, user="bob")
    assert json.loads(payload["channel_data"]) == {"user_id": "bob"}


def test_encrypted_channel_gets_the_library_shared_secret():
    status, payload = answer({"socket_id": SOCKET, "channel_name": "private-encrypted-a"})
    assert status == 200
    expected = LIBRARY.authenticate("private-encrypted-a", SOCKET)
    assert payload["auth"] == expected["auth"]
    assert payload["shared_secret"] == expected["shared_secret"].decode()


def test_signin_signs_the_user_data():
    status, payload = answer({"socket_id": SOCKET}, user={"id": "7", "watchlist": ["8"]})
    assert status == 200
    assert json.loads(payload["user_data"]) == {"id": "7", "watchlist": ["8"]}
    assert user_auth_ok(APP, SOCKET, payload["user_data"], payload["auth"])


@pytest.mark.parametrize("fields, user, options, status, error", [
    ({"channel_name": "private-a"}, ALICE, {}, 400, "Invalid socket_id"),
    ({"socket_id": "1.2; drop", "channel_name": "private-a"}, ALICE, {}, 400, "Invalid socket_id"),
    ({"socket_id": SOCKET, "channel_name": "private-a b"}, ALICE, {}, 400, "Invalid channel_name"),
    ({"socket_id": SOCKET, "channel_name": ""}, ALICE, {}, 400, "Invalid channel_name"),
    ({"socket_id": SOCKET, "channel_name": "public"}, ALICE, {}, 400,
     "Only private- and presence- channels need authorization"),
    ({"socket_id": SOCKET, "channel_name": "#server-to-user-7"}, ALICE, {}, 400,
     "Only private- and presence- channels need authorization"),
    ({"socket_id": SOCKET, "channel_name": "private-a"}, None, {}, 403, "Not signed in"),
    ({"socket_id": SOCKET, "channel_name": "presence-a"}, None, {}, 403, "Not signed in"),
    ({"socket_id": SOCKET}, None, {}, 403, "Not signed in"),
    ({"socket_id": SOCKET, "channel_name": "private-b"}, ALICE,
     {"allow": lambda user, channel: channel == "private-a"}, 403, "Not allowed to join private-b"),
])
def test_bad_or_refused_requests(fields, user, options, status, error):
    assert answer(fields, user, **options) == (status, {"error": error})


def test_encrypted_channels_need_the_master_key():
    status, payload = Authorizer(APP).answer(
        {"socket_id": SOCKET, "channel_name": "private-encrypted-a"}, ALICE)
    assert status == 403 and "encryption_master_key" in payload["error"]
    with pytest.raises(ValueError, match="32 bytes"):
        Authorizer(APP, encryption_master_key="c2hvcnQ=")


@pytest.mark.parametrize("user", [{"name": "no id"}, {"id": ""}, {"id": True}, "x" * 129])
def test_a_host_user_without_a_usable_id_is_a_programming_error(user):
    with pytest.raises(ValueError):
        answer({"socket_id": SOCKET}, user=user)


def test_flask_blueprint_answers_at_pusher_js_default_endpoints():
    host = Flask("host")
    host.register_blueprint(auth_blueprint(
        APP, lambda request: {"id": request.headers["X-User"]} if "X-User" in request.headers
        else None))
    client = host.test_client()
    answer = client.post("/pusher/auth", data={"socket_id": SOCKET, "channel_name": "private-a"},
                         headers={"X-User": "7"})
    assert answer.status_code == 200
    assert answer.json == LIBRARY.authenticate("private-a", SOCKET)
    answer = client.post("/pusher/user-auth", data={"socket_id": SOCKET}, headers={"X-User": "7"})
    assert answer.status_code == 200 and json.loads(answer.json["user_data"]) == {"id": "7"}
    answer = client.post("/pusher/auth", data={"socket_id": SOCKET, "channel_name": "private-a"})
    assert (answer.status_code, answer.json) == (403, {"error": "Not signed in"})
