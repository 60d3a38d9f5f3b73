"""The authorization helper for host applications (bunpulse.authorizer): its answers are what
the official PyPI library would sign, and what BunPulse accepts; bad requests get 400, anonymous
or refused users 403, and without the host's rule private and encrypted channels are refused.
pusher-js drives it end to end here (the default) and in tests/test_hosting.py (every way)."""
import json
import logging
import threading

import pusher
import pytest
from flask import Flask
from werkzeug.serving import make_server

from bunpulse.apps import App
from bunpulse.authorizer import NO_RULE, Authorizer, auth_blueprint
from bunpulse.signatures import channel_auth_ok, user_auth_ok
from conftest import APP_ID, KEY, MASTER_KEY, SECRET

APP = App(id=APP_ID, key=KEY, secret=SECRET)
LIBRARY = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET,
                        encryption_master_key_base64=MASTER_KEY)
SOCKET = "123.456"
ALICE = {"id": 7, "user_info": {"name": "Alice"}}


def everyone(user, channel):
    return True


def answer(fields, user=ALICE, **options):
    """The helper's answer, with a rule that lets everyone in unless the test gives one."""
    options.setdefault("allow", everyone)
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
    status, payload = Authorizer(APP, allow=everyone).answer(
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
        else None, allow=everyone))
    client = host.test_client()
    answer = client.post("/pusher/auth", data={"socket_id": SOCKET, "channel_name": "private-a"},
                         headers={"X-User": "7"})
    assert answer.status_code == 200
    assert answer.json == LIBRARY.authenticate("private-a", SOCKET)
    answer = client.post("/pusher/user-auth", data={"socket_id": SOCKET}, headers={"X-User": "7"})
    assert answer.status_code == 200 and json.loads(answer.json["user_data"]) == {"id": "7"}
    answer = client.post("/pusher/auth", data={"socket_id": SOCKET, "channel_name": "private-a"})
    assert (answer.status_code, answer.json) == (403, {"error": "Not signed in"})


# ------------------------------------------------------------------------ no rule given

def own_channel_only(user, channel):
    """The README's rule."""
    if channel.startswith("private-user-"):
        return channel == f"private-user-{user['id']}"
    return True


@pytest.mark.parametrize("channel", ["private-a", "private-user-bob", "private-user-7",
                                     "private-encrypted-a", "private-cache-a",
                                     "private-encrypted-cache-a"])
def test_without_a_rule_private_and_encrypted_channels_are_refused(channel):
    status, payload = Authorizer(APP, encryption_master_key=MASTER_KEY).answer(
        {"socket_id": SOCKET, "channel_name": channel}, ALICE)
    assert (status, payload) == (403, {"error": NO_RULE})  # no auth, no shared_secret


@pytest.mark.parametrize("channel", ["presence-a", "presence-cache-a"])
def test_without_a_rule_presence_still_admits_the_host_user_as_themselves(channel):
    status, payload = Authorizer(APP).answer({"socket_id": SOCKET, "channel_name": channel},
                                             ALICE)
    assert status == 200
    assert json.loads(payload["channel_data"])["user_id"] == "7"
    assert channel_auth_ok(APP, SOCKET, channel, payload["auth"], payload["channel_data"])


def test_without_a_rule_one_line_says_so_when_the_helper_is_made(caplog):
    with caplog.at_level(logging.WARNING, logger="bunpulse"):
        authorizer = Authorizer(APP)
        for _ in range(3):
            authorizer.answer({"socket_id": SOCKET, "channel_name": "private-a"}, ALICE)
        auth_blueprint(APP, lambda request: None)
    lines = [r.getMessage() for r in caplog.records if "no allow rule" in r.getMessage()]
    assert len(lines) == 2, lines  # one per helper made, none per request
    assert "private- and private-encrypted- channels are refused" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bunpulse"):
        Authorizer(APP, allow=own_channel_only)
    assert not caplog.records


def test_a_rule_decides_private_encrypted_and_presence_channels():
    def answer_for(channel, user=ALICE):
        return answer({"socket_id": SOCKET, "channel_name": channel}, user,
                      allow=own_channel_only)[0]
    assert answer_for("private-user-7") == 200
    assert answer_for("private-user-8") == 403
    assert answer_for("private-encrypted-room") == 200
    assert answer_for("presence-room") == 200
    assert answer_for("private-user-8", user="8") == 200


# ------------------------------------------------------------------------ pusher-js end to end

class Host:
    """A host application in this process: the blueprint, as the README mounts it."""

    def __init__(self, **options):
        app = Flask("host")
        app.register_blueprint(auth_blueprint(
            APP, lambda request: {"id": request.headers["X-User"]}
            if "X-User" in request.headers else None,
            encryption_master_key=MASTER_KEY, **options))
        self.httpd = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def host_for():
    hosts = []

    def make(**options):
        hosts.append(Host(**options))
        return hosts[-1]

    yield make
    for host in hosts:
        host.close()


def refused(node, client, channel):
    node.call("subscribe", id=client, channel=channel)
    return node.wait_event(client, "pusher:subscription_error", channel)["data"]["status"]


def test_pusher_js_without_a_rule_gets_presence_but_no_private_channel(server, node, host_for):
    host = host_for()
    node.connect("alice", authBase=host.url, headers={"X-User": "alice"})
    assert node.subscribe("alice", "presence-room")["data"]["me"]["id"] == "alice"
    for channel in ("private-user-bob", "private-room", "private-encrypted-room"):
        assert refused(node, "alice", channel) == 403
    assert not node.events("alice", "pusher:subscription_succeeded", "private-room")


def test_pusher_js_with_the_readme_rule(server, node, host_for):
    host = host_for(allow=own_channel_only)
    node.connect("alice", authBase=host.url, headers={"X-User": "alice"})
    node.subscribe("alice", "private-user-alice")
    node.subscribe("alice", "private-encrypted-room")
    assert refused(node, "alice", "private-user-bob") == 403
