"""Several key/secret pairs per app (issue 22, item 3): every active pair connects, calls the
HTTP API and signs channel and user authorizations, each verified with its own secret; webhooks
are signed with the primary pair; and a rotation through the apps file, re-read in place
(--apps-file-reload), closes no connection: pusher-js, the PyPI `pusher` library and the npm
`pusher` library across it, then the retired pair refused (4001 on connect, 401 on the API)."""
import json
import os
import sys
import time

import pusher
import pytest
import requests

from conftest import (APP_ID, KEY, SECRET, RawClient, connected, gunicorn_workers, raw_signin,
                      raw_subscribe, signed_request, wait_until)
from test_apps import start_failing, write_apps

ROTATED = "30"
OLD = {"key": "key-2025", "secret": "secret-2025"}
NEW = {"key": "key-2026", "secret": "secret-2026"}
RELOAD = 1  # --apps-file-reload, seconds
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]


def replace_file(path, apps):
    """Write the apps file as an operator should: elsewhere, then moved into place."""
    spare = f"{path}.new"
    with open(spare, "w") as handle:
        json.dump(apps, handle)
    os.replace(spare, path)
    time.sleep(RELOAD + 0.3)  # every worker's next lookup is due and reads it


def library(server, pair, app_id=ROTATED):
    return pusher.Pusher(app_id=app_id, key=pair["key"], secret=pair["secret"],
                         host=server.host, port=server.port, ssl=False, timeout=5)


def opens(server, key):
    """Whether a WebSocket to /app/<key> is established (else the close code it got)."""
    client = RawClient(f"{server.ws_url}/app/{key}?protocol=7&client=py&version=1.0")
    try:
        message = client.recv()
        if isinstance(message, dict) and message.get("event") == "pusher:connection_established":
            return True
        return client.recv_close()[0] if isinstance(message, dict) else message[1]
    finally:
        client.close()


def subscribes(server, key, channel, pair):
    """A connection opened with `key` subscribes to `channel` with an auth signed by `pair`:
    the event it gets back."""
    client = RawClient(f"{server.ws_url}/app/{key}?protocol=7&client=py&version=1.0")
    try:
        raw_subscribe(client, connected(client), channel, key=pair["key"], secret=pair["secret"])
        return client.recv()["event"]
    finally:
        client.close()


# ------------------------------------------------------------------------ every pair works

@pytest.fixture(scope="module")
def two_pairs(tmp_path_factory):
    """The environment's app with a second pair (BUNPULSE_APP_KEYS), and an apps-file app given
    by `keys` alone (its first pair the primary); webhooks to a receiver."""
    from conftest import ServerProcess, WebhookReceiver
    receiver = WebhookReceiver()
    path = write_apps(tmp_path_factory.mktemp("keys"), [
        {"id": ROTATED, "keys": [NEW, OLD], "webhooks": [{"url": receiver.url}]}])
    server = ServerProcess(env={"BUNPULSE_APP_KEYS": "test-key-2:test-secret-2",
                                "BUNPULSE_APPS_FILE": path, "BUNPULSE_WEBHOOK_BATCH_MS": "0",
                                "BUNPULSE_WEBHOOK_DELAY_MS": "0"})
    yield server, receiver
    server.stop()
    receiver.close()


def test_clients_connect_with_any_active_key(two_pairs):
    server, _ = two_pairs
    for key in (KEY, "test-key-2", NEW["key"], OLD["key"]):
        assert opens(server, key) is True, key
    assert opens(server, "test-secret-2") == 4001  # a secret is no key


def test_api_calls_verify_against_the_pair_auth_key_names(two_pairs):
    server, _ = two_pairs
    path = f"/apps/{APP_ID}/events"
    body = {"name": "e", "channel": "c", "data": "{}"}
    for key, secret in ((KEY, SECRET), ("test-key-2", "test-secret-2")):
        assert signed_request(server, "POST", path, body, key=key, secret=secret).status_code \
            == 200, key
    crossed = signed_request(server, "POST", path, body, key="test-key-2", secret=SECRET)
    assert crossed.status_code == 401 and "Invalid signature" in crossed.json()["error"]
    unknown = signed_request(server, "POST", path, body, key=NEW["key"], secret=NEW["secret"])
    assert unknown.status_code == 401 and unknown.json()["error"] == "Unknown auth_key"
    for secret, status in ((SECRET, 200), ("test-secret-2", 200), (NEW["secret"], 401)):
        answer = requests.post(server.url + path, json=body, timeout=5,
                               headers={"Authorization": f"Bearer {secret}"})
        assert answer.status_code == status, (secret, answer.text)


def test_the_official_library_calls_with_either_pair(two_pairs):
    server, _ = two_pairs
    for pair in (NEW, OLD):
        assert library(server, pair).trigger("c", "e", {}) == {}
    with pytest.raises(pusher.errors.PusherBadAuth):
        library(server, {"key": OLD["key"], "secret": NEW["secret"]}).trigger("c", "e", {})


def test_authorizations_verify_against_the_pair_their_key_names(two_pairs):
    server, _ = two_pairs
    # Opened with one key, signed with the other: the signature's key decides.
    assert subscribes(server, NEW["key"], "private-a", OLD) == \
        "pusher_internal:subscription_succeeded"
    assert subscribes(server, OLD["key"], "private-a", NEW) == \
        "pusher_internal:subscription_succeeded"
    assert subscribes(server, KEY, "private-a", {"key": "test-key-2", "secret": "test-secret-2"}) \
        == "pusher_internal:subscription_succeeded"
    crossed = {"key": NEW["key"], "secret": OLD["secret"]}
    assert subscribes(server, NEW["key"], "private-a", crossed) == "pusher:subscription_error"
    # A pair of another app signs nothing here.
    assert subscribes(server, NEW["key"], "private-a", {"key": KEY, "secret": SECRET}) == \
        "pusher:subscription_error"
    client = RawClient(f"{server.ws_url}/app/{NEW['key']}?protocol=7&client=py&version=1.0")
    try:
        raw_signin(client, connected(client), {"id": "u1"}, key=OLD["key"],
                   secret=OLD["secret"])
        assert client.recv_event("pusher:signin_success")
    finally:
        client.close()


def test_webhooks_are_signed_with_the_primary_pair(two_pairs):
    server, receiver = two_pairs
    client = RawClient(f"{server.ws_url}/app/{OLD['key']}?protocol=7&client=py&version=1.0")
    try:
        raw_subscribe(client, connected(client), "hooked")
        client.recv_event("pusher_internal:subscription_succeeded")
        wait_until(lambda: receiver.events("channel_occupied"), 10)
    finally:
        client.close()
    request = next(r for r in receiver.requests if b"channel_occupied" in r["body"])
    assert request["headers"]["X-Pusher-Key"] == NEW["key"]
    assert library(server, NEW).validate_webhook(
        request["headers"]["X-Pusher-Key"], request["headers"]["X-Pusher-Signature"],
        request["body"].decode()) is not None


@pytest.mark.parametrize("content, says", [
    ([{"id": "8", "keys": {"key": "k", "secret": "s"}}], "field 'keys' must be a list"),
    ([{"id": "8", "keys": [{"key": "k"}]}], "keys[0]: field 'secret' must be"),
    ([{"id": "8", "keys": [{"key": "k", "secret": "s", "id": "x"}]}],
     "keys[0]: unknown field 'id'"),
    ([{"id": "8", "key": "k", "secret": "s", "keys": [{"key": "k", "secret": "t"}]}],
     "the key 'k' is given twice"),
    ([{"id": "8", "keys": []}], "field 'key' is missing (or give 'keys')"),
    ([{"id": "8", "key": "k", "keys": [{"key": "j", "secret": "t"}]}],
     "field 'secret' is missing"),
    ([{"id": "8", "key": "k", "secret": "s"}, {"id": "9", "key": "j", "secret": "s",
                                               "keys": [{"key": "k", "secret": "t"}]}],
     "app 9: field 'key' 'k' is already used by app 8"),
    ([{"id": "8", "key": "k", "secret": "s", "keys": [{"key": KEY, "secret": "t"}]}],
     f"app 8: field 'key' '{KEY}' is already used by app 1 of PUSHER_APP_ID"),
], ids=["not-a-list", "pair-without-secret", "pair-unknown-field", "key-twice-in-app",
        "no-pair", "key-without-secret", "key-of-another-app", "key-of-env-app"])
def test_malformed_keys_stop_start_up(tmp_path, content, says):
    path = write_apps(tmp_path, content)
    result = start_failing(["--apps-file", path])
    assert result.returncode == 2, result.stderr + result.stdout
    message = result.stderr.strip().splitlines()[-1]
    assert path in message and says in message, message


@pytest.mark.parametrize("value, says", [
    ("test-key-2", "key:secret pairs"),
    ("test-key-2:s,:t", "key:secret pairs"),
    (f"{KEY}:other", "given twice"),
    ("a:s,a:t", "given twice"),
])
def test_malformed_app_keys_stop_start_up(value, says):
    result = start_failing(env={"BUNPULSE_APP_KEYS": value})
    assert result.returncode == 2 and "BUNPULSE_APP_KEYS" in result.stderr \
        and says in result.stderr, result.stderr


# ------------------------------------------------------------------------ rotation, live

def rotation_apps(*pairs, webhook):
    primary, *others = pairs
    return [{"id": ROTATED, **primary, "keys": others, "webhooks": [{"url": webhook}]}]


def run_rotation(server, path, node_for, receiver):
    """The documented rotation (add, move, promote, retire) against `server`, with clients of
    both pairs connected throughout; asserts that none of them ever left 'connected'."""
    old_node = node_for(server, app_id=ROTATED, key=OLD["key"], secret=OLD["secret"])
    new_node = node_for(server, app_id=ROTATED, key=NEW["key"], secret=NEW["secret"])
    old_api, new_api = library(server, OLD), library(server, NEW)
    # Before: pusher-js on the old key, authorized by the npm library with the old pair.
    for client in ("o1", "o2"):
        old_node.connect(client)
        old_node.subscribe(client, "private-rotation")
    old_node.call("connect", id="p1", presence={"user_id": "p1"})
    old_node.subscribe("p1", "presence-rotation")
    assert opens(server, NEW["key"]) == 4001

    # 1. Add the new pair.
    replace_file(path, rotation_apps(OLD, NEW, webhook=receiver.url))
    # 2. Move: clients on the new key, servers on the new pair; the old ones still work, and a
    # connection opened with the old key takes an authorization signed with the new pair.
    new_node.connect("n1")
    new_node.subscribe("n1", "private-rotation")
    new_node.connect("x1", key=OLD["key"])
    new_node.subscribe("x1", "private-rotation")
    old_node.connect("o3")
    old_node.subscribe("o3", "private-rotation")
    for n, api in enumerate((old_api, new_api)):
        api.trigger("private-rotation", "tick", {"n": n})
    new_node.call("api", method="trigger", args=["private-rotation", "tick", {"n": 2}])
    old_node.call("api", method="trigger", args=["private-rotation", "tick", {"n": 3}])
    for node, ids in ((old_node, ("o1", "o2", "o3")), (new_node, ("n1", "x1"))):
        for client in ids:
            wait_until(lambda: len(node.events(client, "tick")) == 4, 10,
                       message=f"4 ticks on {client}")
    assert new_api.users_info("presence-rotation")["users"] == [{"id": "p1"}]

    # 3. Promote the new pair: webhooks are signed with it from then on.
    replace_file(path, rotation_apps(NEW, OLD, webhook=receiver.url))
    receiver.requests.clear()
    new_node.subscribe("n1", "promoted")
    wait_until(lambda: receiver.events("channel_occupied"), 10)
    hook = next(r for r in receiver.requests if b"channel_occupied" in r["body"])
    assert hook["headers"]["X-Pusher-Key"] == NEW["key"]
    assert new_api.validate_webhook(hook["headers"]["X-Pusher-Key"],
                                    hook["headers"]["X-Pusher-Signature"],
                                    hook["body"].decode()) is not None
    verdict = new_node.call("webhook", headers={k.lower(): v for k, v in hook["headers"].items()},
                            rawBody=hook["body"].decode())["result"]
    assert verdict["valid"] is True

    # 4. Retire the old pair: refused on connect (4001) and on the API (401).
    replace_file(path, rotation_apps(NEW, webhook=receiver.url))
    assert opens(server, OLD["key"]) == 4001
    with pytest.raises(pusher.errors.PusherBadAuth):
        old_api.trigger("private-rotation", "tick", {"n": 4})
    refused = old_node.call("api", method="trigger", fails=True,
                            args=["private-rotation", "tick", {"n": 4}])
    assert refused["status"] == 401, refused
    # Nobody was disconnected: every client, the old-key ones too, still gets events.
    new_api.trigger("private-rotation", "tick", {"n": 5})
    for node, ids in ((old_node, ("o1", "o2", "o3")), (new_node, ("n1", "x1"))):
        for client in ids:
            wait_until(lambda: len(node.events(client, "tick")) == 5, 10,
                       message=f"5 ticks on {client}")
    for node in (old_node, new_node):
        left = [r for r in node.reports if r.get("type") == "state"
                and r["previous"] == "connected"]
        assert not left, left
    assert new_api.users_info("presence-rotation")["users"] == [{"id": "p1"}]


def test_rotation_without_a_disconnect(start_server, tmp_path, node_for, webhook_receiver):
    path = write_apps(tmp_path, rotation_apps(OLD, webhook=webhook_receiver.url))
    server = start_server(env={"BUNPULSE_APPS_FILE": path, "BUNPULSE_APPS_FILE_RELOAD":
                               str(RELOAD), "BUNPULSE_WEBHOOK_BATCH_MS": "0"})
    run_rotation(server, path, node_for, webhook_receiver)
    assert server.log().count("apps file reloaded") == 3


def test_rotation_under_gunicorn_with_two_workers(start_server, tmp_path, node_for,
                                                  webhook_receiver, redis_server):
    """Each worker reads the file by itself; the kernel hands connections and API calls to
    either, so every step is checked against both (not asserted per worker)."""
    path = write_apps(tmp_path, rotation_apps(OLD, webhook=webhook_receiver.url))
    server = start_server(command=GUNICORN, env={
        "BUNPULSE_APPS_FILE": path, "BUNPULSE_APPS_FILE_RELOAD": str(RELOAD),
        "BUNPULSE_WEBHOOK_BATCH_MS": "0", "BUNPULSE_WORKERS": "2", **redis_server.env})
    gunicorn_workers(server)
    run_rotation(server, path, node_for, webhook_receiver)


# ------------------------------------------------------------------------ reloading the file

def test_a_broken_file_keeps_the_apps_served(start_server, tmp_path):
    path = write_apps(tmp_path, [{"id": ROTATED, **OLD}])
    server = start_server(env={"BUNPULSE_APPS_FILE": path,
                               "BUNPULSE_APPS_FILE_RELOAD": str(RELOAD)})
    with open(path, "w") as handle:  # half-written
        handle.write('[{"id": "30", "key": "key-2025", "secret": ')
    for _ in range(2):  # the same broken version, looked at twice: one error line
        time.sleep(RELOAD + 0.3)
        assert opens(server, OLD["key"]) is True
        assert library(server, OLD).trigger("c", "e", {}) == {}
    assert server.log().count("apps file not reloaded") == 1, server.log()
    assert "invalid JSON" in server.log()
    with open(path, "wb") as handle:  # not even UTF-8: refused the same way, no traceback
        handle.write(b'[{"id": "30", "key": "\xff"}]')
    time.sleep(RELOAD + 0.3)
    assert opens(server, OLD["key"]) is True
    assert "not UTF-8" in server.log() and "Traceback" not in server.log(), server.log()
    replace_file(path, [{"id": ROTATED, **NEW}])
    assert opens(server, NEW["key"]) is True
    assert opens(server, OLD["key"]) == 4001


def test_a_subscription_looks_at_the_file_itself(start_server, tmp_path):
    """No connect and no API call after the change: the subscription's own look reads it."""
    path = write_apps(tmp_path, [{"id": ROTATED, **OLD}])
    server = start_server(env={"BUNPULSE_APPS_FILE": path,
                               "BUNPULSE_APPS_FILE_RELOAD": str(RELOAD)})
    client = RawClient(f"{server.ws_url}/app/{OLD['key']}?protocol=7&client=py&version=1.0")
    try:
        socket_id = connected(client)
        replace_file(path, [{"id": ROTATED, **OLD, "keys": [NEW]}])
        raw_subscribe(client, socket_id, "private-looked", key=NEW["key"],
                      secret=NEW["secret"])
        assert client.recv_event("pusher_internal:subscription_succeeded")
    finally:
        client.close()


def test_open_connections_take_the_new_record(start_server, tmp_path):
    """A change applies to connections already open once any lookup reads it (here another
    client's connect): client events turned off refuse the next one of an open connection."""
    path = write_apps(tmp_path, [{"id": ROTATED, **OLD}])
    server = start_server(env={"BUNPULSE_APPS_FILE": path,
                               "BUNPULSE_APPS_FILE_RELOAD": str(RELOAD)})
    client = RawClient(f"{server.ws_url}/app/{OLD['key']}?protocol=7&client=py&version=1.0")
    try:
        raw_subscribe(client, connected(client), "private-events", key=OLD["key"],
                      secret=OLD["secret"])
        client.recv_event("pusher_internal:subscription_succeeded")
        replace_file(path, [{"id": ROTATED, **OLD, "client_events": False}])
        assert opens(server, OLD["key"]) is True
        client.send({"event": "client-x", "channel": "private-events", "data": {}})
        error = client.recv_event("pusher:error")
        assert "not enabled" in error["data"]["message"], error
    finally:
        client.close()


def test_a_webhook_is_signed_by_the_pair_promoted_since(start_server, tmp_path,
                                                       webhook_receiver):
    """An unsubscribe after the promotion, with no lookup between: its channel_vacated is
    signed with the new primary pair, not the one the connection opened under."""
    hooks = [{"url": webhook_receiver.url}]
    path = write_apps(tmp_path, [{"id": ROTATED, **OLD, "keys": [NEW], "webhooks": hooks}])
    server = start_server(env={"BUNPULSE_APPS_FILE": path, "BUNPULSE_APPS_FILE_RELOAD":
                               str(RELOAD), "BUNPULSE_WEBHOOK_BATCH_MS": "0",
                               "BUNPULSE_WEBHOOK_DELAY_MS": "0"})
    client = RawClient(f"{server.ws_url}/app/{OLD['key']}?protocol=7&client=py&version=1.0")
    try:
        raw_subscribe(client, connected(client), "vacated")
        client.recv_event("pusher_internal:subscription_succeeded")
        replace_file(path, [{"id": ROTATED, **NEW, "keys": [OLD], "webhooks": hooks}])
        client.send({"event": "pusher:unsubscribe", "data": {"channel": "vacated"}})
        wait_until(lambda: webhook_receiver.events("channel_vacated"), 10)
    finally:
        client.close()
    hook = next(r for r in webhook_receiver.requests if b"channel_vacated" in r["body"])
    assert hook["headers"]["X-Pusher-Key"] == NEW["key"]


def test_read_once_with_reload_off(start_server, tmp_path):
    path = write_apps(tmp_path, [{"id": ROTATED, **OLD}])
    server = start_server(env={"BUNPULSE_APPS_FILE": path, "BUNPULSE_APPS_FILE_RELOAD": "0"})
    replace_file(path, [{"id": ROTATED, **NEW}])
    assert opens(server, OLD["key"]) is True
    assert opens(server, NEW["key"]) == 4001
