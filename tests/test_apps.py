"""Several apps in one server (--apps-file / BUNPULSE_APPS_FILE) beside the PUSHER_APP_* app:
isolation, per-app switches and limits, authorized connections, and start-up refusals."""
import json
import os
import subprocess
import sys

import pusher
import pytest

from conftest import (APP_ID, KEY, ROOT, SECRET, ServerProcess, WebhookReceiver, assert_alive,
                      connected, raw_signin, raw_subscribe, until_pong, wait_until)

APPS = [
    {"id": 2, "key": "key-two", "secret": "secret-two"},
    {"id": "3", "key": "key-three", "secret": "secret-three", "client_events": False},
    {"id": "4", "key": "key-off", "secret": "secret-off", "enabled": False},
    {"id": "5", "key": "key-small", "secret": "secret-small", "max_connections": 2},
    {"id": "6", "key": "key-auth", "secret": "secret-auth", "user_authentication_timeout": 400},
    {"id": "8", "key": "key-members", "secret": "secret-members",
     "max_presence_member_size_in_kb": 2},
]
CREDENTIALS = {str(a["id"]): (a["key"], a["secret"]) for a in APPS}
CREDENTIALS[APP_ID] = (KEY, SECRET)


def write_apps(tmp_path, content, name="apps.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """One server with the environment's app "1" and the apps file's apps."""
    webhooks = WebhookReceiver()
    apps = [dict(a) for a in APPS]
    apps[0]["webhooks"] = [{"url": webhooks.url, "event_types": ["channel_occupied"]}]
    path = write_apps(tmp_path_factory.mktemp("apps"), apps)
    server = ServerProcess(env={"BUNPULSE_APPS_FILE": path, "BUNPULSE_WEBHOOK_BATCH_MS": "0"})
    server.webhooks = webhooks
    yield server
    server.stop()
    webhooks.close()


def api_for(server, app_id):
    key, secret = CREDENTIALS[app_id]
    return pusher.Pusher(app_id=app_id, key=key, secret=secret, host=server.host,
                         port=server.port, ssl=False)


def raw_app(raw, server, app_id):
    return raw(f"/app/{CREDENTIALS[app_id][0]}?protocol=7", target=server)


def join(raw, server, app_id, channel, user_id=None):
    """A raw subscriber of app_id; returns the client."""
    client = raw_app(raw, server, app_id)
    key, secret = CREDENTIALS[app_id]
    channel_data = json.dumps({"user_id": user_id}) if user_id else None
    raw_subscribe(client, connected(client), channel, channel_data, key=key, secret=secret)
    assert client.recv_event("pusher_internal:subscription_succeeded")["channel"] == channel
    return client


def until_marker(client, channel):
    seen = []
    while True:
        message = client.recv()
        assert not isinstance(message, tuple), f"closed: {message}"
        if message.get("event") == "marker" and message.get("channel") == channel:
            return [m["event"] for m in seen]
        seen.append(message)


def presence_join(client, app_id, channel, user_id, info_bytes):
    """Subscribe to a presence channel with a user_info of exactly info_bytes (as JSON)."""
    info = {"n": ""}
    info["n"] = "x" * (info_bytes - len(json.dumps(info, separators=(",", ":"))))
    key, secret = CREDENTIALS[app_id]
    raw_subscribe(client, connected(client), channel,
                  json.dumps({"user_id": user_id, "user_info": info}), key=key, secret=secret)
    return client.recv()  # subscription_succeeded, or subscription_error


# ------------------------------------------------------------------------ isolation

def test_events_do_not_cross_apps(multi, raw, node_for):
    clients = {app_id: join(raw, multi, app_id, "shared") for app_id in ("1", "2", "3")}
    node = node_for(multi, app_id="2", key="key-two", secret="secret-two")
    node.connect("js")
    node.subscribe("js", "shared")
    assert node.call("api", method="trigger", args=["shared", "only-two", {"a": 1}])["ok"]
    assert clients["2"].recv_event("only-two")["data"] == '{"a":1}'
    node.wait_event("js", "only-two", "shared")
    for app_id in ("1", "3"):
        api_for(multi, app_id).trigger("shared", "marker", {})
        assert until_marker(clients[app_id], "shared") == []
    # Each app's API answers for its own channels only.
    for app_id, expected in (("1", 1), ("2", 2), ("3", 1), ("5", 0)):
        info = api_for(multi, app_id).channel_info("shared", ["subscription_count"])
        assert info.get("subscription_count", 0) == expected, app_id


def test_members_do_not_cross_apps(multi, raw):
    one = join(raw, multi, "1", "presence-room", user_id="alice")
    join(raw, multi, "2", "presence-room", user_id="bob")
    three = join(raw, multi, "3", "presence-room", user_id="carol")
    assert api_for(multi, "1").users_info("presence-room") == {"users": [{"id": "alice"}]}
    assert api_for(multi, "2").users_info("presence-room") == {"users": [{"id": "bob"}]}
    for app_id, client in (("1", one), ("3", three)):
        api_for(multi, app_id).trigger("presence-room", "marker", {})
        assert until_marker(client, "presence-room") == []  # no member_added from app 2


def test_credentials_do_not_cross_apps(multi, raw):
    client = raw_app(raw, multi, "2")
    raw_subscribe(client, connected(client), "private-x", key=KEY, secret=SECRET)
    assert client.recv_event("pusher:subscription_error")["data"]["status"] == 401
    wrong = pusher.Pusher(app_id="2", key=KEY, secret=SECRET, host=multi.host, port=multi.port,
                          ssl=False)
    with pytest.raises(pusher.errors.PusherBadAuth):
        wrong.trigger("shared", "nope", {})


def test_users_do_not_cross_apps(multi, raw):
    def signed_in(app_id, user_id, watchlist=None):
        client = raw_app(raw, multi, app_id)
        key, secret = CREDENTIALS[app_id]
        user = {"id": user_id} if watchlist is None else {"id": user_id, "watchlist": watchlist}
        raw_signin(client, connected(client), user, key=key, secret=secret)
        assert client.recv_event("pusher:signin_success")
        return client

    watcher = signed_in("1", "w", ["dave"])
    assert watcher.recv_event("pusher_internal:watchlist_events")["data"]["events"] == [
        {"name": "offline", "user_ids": ["dave"]}]
    other = signed_in("2", "dave")  # dave of app 2 is not dave of app 1
    assert until_pong(watcher) == []
    dave = signed_in("1", "dave")
    assert until_pong(watcher) == [{"event": "pusher_internal:watchlist_events", "data": {
        "events": [{"name": "online", "user_ids": ["dave"]}]}}]
    api_for(multi, "2").terminate_user_connections("dave")
    assert other.recv_close()[0] == 4009
    assert until_pong(dave) == []  # app 1's dave is still connected
    assert until_pong(watcher) == []  # and still online


def test_webhooks_are_per_app(multi, raw):
    join(raw, multi, "1", "hooked-one")
    join(raw, multi, "2", "hooked-two")
    wait_until(lambda: [e for e in multi.webhooks.events("channel_occupied")
                        if e["channel"] == "hooked-two"], message="app 2's webhook")
    assert all(e["channel"] != "hooked-one" for e in multi.webhooks.events())
    request = next(r for r in multi.webhooks.requests if b"hooked-two" in r["body"])
    assert request["headers"]["X-Pusher-Key"] == "key-two"
    api = api_for(multi, "2")
    assert api.validate_webhook(request["headers"]["X-Pusher-Key"],
                                request["headers"]["X-Pusher-Signature"],
                                request["body"].decode()) is not None


# ------------------------------------------------------------------------ per-app switches

def test_disabled_app_is_refused_with_4003(multi, raw):
    client = raw_app(raw, multi, "4")
    error = client.recv()
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4003
    assert client.recv_close()[0] == 4003
    with pytest.raises(pusher.errors.PusherForbidden):
        api_for(multi, "4").trigger("x", "y", {})


def test_max_connections_refuses_the_extra_one_with_4004(multi, raw):
    first, second = raw_app(raw, multi, "5"), raw_app(raw, multi, "5")
    connected(first)
    connected(second)
    extra = raw_app(raw, multi, "5")
    error = extra.recv()
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4004
    assert extra.recv_close()[0] == 4004
    connected(raw_app(raw, multi, "2"))  # another app is not counted
    first.close()

    def admitted():
        client = raw_app(raw, multi, "5")
        message = client.recv()
        client.close()
        return message["event"] == "pusher:connection_established"
    wait_until(admitted, message="a free connection slot")


def test_client_events_are_per_app(multi, raw):
    for app_id, allowed in (("2", True), ("3", False)):
        sender = join(raw, multi, app_id, "private-talk")
        other = join(raw, multi, app_id, "private-talk")
        sender.send({"event": "client-hi", "channel": "private-talk", "data": {}})
        if allowed:
            assert other.recv_event("client-hi")["channel"] == "private-talk"
        else:
            error = sender.recv_event("pusher:error")
            assert "not enabled" in error["data"]["message"]
            api_for(multi, app_id).trigger("private-talk", "marker", {})
            assert until_marker(other, "private-talk") == []


def test_environment_app_client_events_switch_leaves_file_apps_alone(start_server, tmp_path,
                                                                      raw):
    path = write_apps(tmp_path, [APPS[0]])
    server = start_server(env={"BUNPULSE_CLIENT_EVENTS": "false"}, args=["--apps-file", path])
    for app_id, allowed in (("1", False), ("2", True)):
        sender = join(raw, server, app_id, "private-talk")
        other = join(raw, server, app_id, "private-talk")
        sender.send({"event": "client-hi", "channel": "private-talk", "data": {}})
        if allowed:
            assert other.recv_event("client-hi")
        else:
            assert sender.recv_event("pusher:error")["data"]["code"] is None


# ------------------------------------------------------------------------ authorized connections

def test_presence_member_size_is_per_app(multi, raw):
    # app 8 takes 2 KB of user_info, the environment's app Pusher's 1 KB
    answer = presence_join(raw_app(raw, multi, "8"), "8", "presence-big", "u1", 2048)
    assert answer["event"] == "pusher_internal:subscription_succeeded", answer
    answer = presence_join(raw_app(raw, multi, "8"), "8", "presence-big", "u2", 2049)
    assert answer["event"] == "pusher:subscription_error", answer
    assert answer["data"]["status"] == 400 and "2048 bytes" in answer["data"]["error"]
    answer = presence_join(raw_app(raw, multi, APP_ID), APP_ID, "presence-big", "u3", 1025)
    assert answer["event"] == "pusher:subscription_error" and "1024 bytes" in \
        answer["data"]["error"], answer


def test_presence_member_size_holds_for_a_signed_in_user(multi, raw):
    # a presence subscription without channel_data takes the signed-in user's user_info
    key, secret = CREDENTIALS["8"]
    for size, event in ((2048, "pusher_internal:subscription_succeeded"),
                        (2049, "pusher:subscription_error")):
        client = raw_app(raw, multi, "8")
        socket_id = connected(client)
        info = {"n": ""}
        info["n"] = "x" * (size - len(json.dumps(info, separators=(",", ":"))))
        raw_signin(client, socket_id, {"id": f"s{size}", "user_info": info}, key, secret)
        client.recv_event("pusher:signin_success")
        raw_subscribe(client, socket_id, "presence-signed", key=key, secret=secret)
        answer = client.recv()
        assert answer["event"] == event, answer


def test_presence_member_size_of_the_environment_app(start_server, raw):
    server = start_server(env={"BUNPULSE_MAX_PRESENCE_MEMBER_SIZE_IN_KB": "3"})
    answer = presence_join(raw(target=server), APP_ID, "presence-big", "u1", 3072)
    assert answer["event"] == "pusher_internal:subscription_succeeded", answer
    answer = presence_join(raw(target=server), APP_ID, "presence-big", "u2", 3073)
    assert answer["event"] == "pusher:subscription_error" and "3072 bytes" in \
        answer["data"]["error"], answer


def test_user_authentication_timeout(multi, raw):
    key, secret = CREDENTIALS["6"]
    signed = raw_app(raw, multi, "6")
    raw_signin(signed, connected(signed), {"id": "u"}, key=key, secret=secret)
    assert signed.recv_event("pusher:signin_success")
    private = join(raw, multi, "6", "private-ok")
    presence = join(raw, multi, "6", "presence-ok", user_id="p")
    public = join(raw, multi, "6", "public-only")
    left = join(raw, multi, "6", "private-left")  # authorized once is authorized for good
    left.send({"event": "pusher:unsubscribe", "data": {"channel": "private-left"}})
    idle = raw_app(raw, multi, "6")  # opened last: its deadline is the last to pass
    connected(idle)
    for client in (public, idle):
        error = client.recv_event("pusher:error")
        assert error["data"]["code"] == 4009
        assert client.recv_close()[0] == 4009
    for client in (signed, private, presence, left):
        assert_alive(client)
    # Apps without the option never time out.
    plain = raw_app(raw, multi, "2")
    connected(plain)
    assert_alive(plain)


def test_pusher_js_signin_keeps_the_connection(multi, node_for):
    node = node_for(multi, app_id="6", key="key-auth", secret="secret-auth")
    node.connect("late", user={"id": "js"})
    node.call("signin", id="late")
    node.wait(lambda r: r.get("type") == "message" and r["event"] == "pusher:signin_success")
    node.connect("idle")
    node.wait(lambda r: r.get("type") == "error" and r["id"] == "idle")
    node.wait(lambda r: r.get("type") == "state" and r["id"] == "idle"
              and r["current"] in ("disconnected", "failed"))
    assert node.call("state", id="late")["result"] == "connected"


# ------------------------------------------------------------------------ the file itself

def test_apps_file_alone_serves_no_development_app(start_server, tmp_path, raw):
    path = write_apps(tmp_path, {"apps": [APPS[0]]})
    server = start_server(env={"PUSHER_APP_ID": "", "PUSHER_APP_KEY": "",
                               "PUSHER_APP_SECRET": ""}, args=["--apps-file", path])
    connected(raw_app(raw, server, "2"))
    refused = raw("/app/app-key?protocol=7", target=server)
    assert refused.recv()["data"]["code"] == 4001


def start_failing(args=(), env=None):
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("BUNPULSE_", "PUSHER_"))}
    full_env.update({"PUSHER_APP_ID": APP_ID, "PUSHER_APP_KEY": KEY, "PUSHER_APP_SECRET": SECRET,
                     "BUNPULSE_HOST": "127.0.0.1", "BUNPULSE_PORT": "0",
                     "BUNPULSE_ENV_FILE": os.devnull})
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "bunpulse", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=10)


GOOD = {"id": "7", "key": "key-seven", "secret": "secret-seven"}


@pytest.mark.parametrize("content, app, field", [
    ('[{"id": "7", "key": "k", "secret": "s",}]', None, None),
    ([GOOD, {"id": "8", "key": "key-eight"}], "8", "secret"),
    ([GOOD, {"id": "8", "key": "key-eight", "secret": "s", "max_connections": "ten"}],
     "8", "max_connections"),
    ([GOOD, {"id": "8", "key": "key-eight", "secret": "s", "client_events": "no"}],
     "8", "client_events"),
    ([GOOD, {"id": "8", "key": "key-eight", "secret": "s", "max_conections": 3}],
     "8", "max_conections"),
    ([GOOD, {"id": "8", "key": "key-seven", "secret": "s"}], "8", "key"),
    ([GOOD, {"id": "8", "key": KEY, "secret": "s"}], "8", "key"),
    ([GOOD, {"id": 7, "key": "key-eight", "secret": "s"}], "7", "id"),
    ('[{"id": "8", "key": "key-eight", "secret": "a", "secret": "b"}]', "8", "secret"),
    ([dict(GOOD, webhooks=[{"url": "http://h/", "event_type": ["channel_occupied"]}])],
     "7", "event_type"),
    ([dict(GOOD, webhooks=[{"url": "http://h/", "filter": {"channel_name_prefix": "a"}}])],
     "7", "channel_name_prefix"),
    ([dict(GOOD, webhooks=[{"url": "http://h/", "filter": {"channel_name_ends_with": 1}}])],
     "7", "channel_name_ends_with"),
    ([dict(GOOD, webhooks=[{"url": "http://h/", "headers": {"Content-Type": "text/plain"}}])],
     "7", "Content-Type"),
    ([dict(GOOD, webhooks=[{"url": "http://h/", "headers": {"X-Pusher-Signature": "0"}}])],
     "7", "X-Pusher-Signature"),
    ([dict(GOOD, webhooks=[{"url": "http://h/", "headers": {"X-A": "1\r\nHost: b"}}])],
     "7", "X-A"),
    ([dict(GOOD, allowed_origins=["https://app.example.com/path"])], "7", "allowed_origins"),
    ([dict(GOOD, allowed_origins=[])], "7", "allowed_origins"),
    ([dict(GOOD, max_presence_member_size_in_kb=0)], "7", "max_presence_member_size_in_kb"),
    ([dict(GOOD, maxPresenceMemberSizeInKb=2)], "7", "maxPresenceMemberSizeInKb"),
], ids=["bad-json", "missing-secret", "wrong-type-int", "wrong-type-bool", "unknown-field",
        "duplicate-key", "duplicate-key-of-env-app", "duplicate-id", "duplicate-field",
        "webhook-unknown-field", "webhook-filter-unknown-field", "webhook-filter-not-text",
        "webhook-header-content-type", "webhook-header-signature", "webhook-header-line-break",
        "origin-with-path", "no-origin", "member-size-zero", "soketi-name"])
def test_malformed_apps_file_stops_start_up(tmp_path, content, app, field):
    path = write_apps(tmp_path, content)
    result = start_failing(["--apps-file", path])
    assert result.returncode == 2, result.stderr + result.stdout
    message = result.stderr.strip().splitlines()[-1]
    assert path in message
    if app is not None:
        assert f"app {app}" in message and repr(field) in message, message
    else:
        assert "invalid JSON at line 1" in message, message


def test_soketi_names_are_refused_with_the_bunpulse_name(tmp_path):
    path = write_apps(tmp_path, [dict(GOOD, maxPresenceMemberSizeInKb=2)])
    message = start_failing(["--apps-file", path]).stderr.strip().splitlines()[-1]
    assert message.endswith("app 7: unknown field 'maxPresenceMemberSizeInKb' (BunPulse's "
                            "name: 'max_presence_member_size_in_kb')"), message


def test_malformed_apps_file_from_the_environment_stops_start_up(tmp_path):
    path = write_apps(tmp_path, [{"id": "9", "key": "key-nine", "secret": ""}])
    result = start_failing(env={"BUNPULSE_APPS_FILE": path})
    assert result.returncode == 2
    assert path in result.stderr and "app 9" in result.stderr and "'secret'" in result.stderr


def test_unreadable_apps_file_stops_start_up(tmp_path):
    path = str(tmp_path / "missing.json")
    result = start_failing(["--apps-file", path])
    assert result.returncode == 2 and path in result.stderr
