"""The HTTP API (protocol reference section 7) through both official server libraries, plus raw
signed requests for the limits the libraries refuse to send."""
import json
import time
import uuid

import pusher
import pytest
import requests

from bunpulse.request import query_params
from bunpulse.signatures import sign_api_request
from conftest import (APP_ID, KEY, SECRET, assert_alive, assert_signatures_kept, connected,
                      pusher_api, signed_request, wait_until)
from conftest import library_subscribe as subscribe


def uid():
    return uuid.uuid4().hex[:8]


def sign_in(client, api, socket_id, user_id):
    client.send({"event": "pusher:signin",
                 "data": api.authenticate_user(socket_id, {"id": user_id})})
    client.recv_event("pusher:signin_success")
    channel = f"#server-to-user-{user_id}"
    client.send({"event": "pusher:subscribe", "data": {"channel": channel}})
    client.recv_event("pusher_internal:subscription_succeeded")


def raw_member(raw, api, channel, user_id):
    client = raw()
    subscribe(client, api, channel, {"user_id": user_id, "user_info": {"n": user_id}},
              connected(client))
    return client


# ------------------------------------------------------------------ PyPI `pusher`

def test_trigger_to_several_channels(api, raw):
    first, second = f"a-{uid()}", f"b-{uid()}"
    clients = []
    for channel in (first, second):
        client = raw()
        connected(client)
        subscribe(client, api, channel)
        clients.append(client)
    assert api.trigger([first, second], "multi", {"n": 1}) == {}
    for client, channel in zip(clients, (first, second)):
        event = client.recv_event("multi")
        assert event["channel"] == channel and json.loads(event["data"]) == {"n": 1}


def test_trigger_excludes_socket_id(api, node):
    channel = f"ex-{uid()}"
    sender = node.connect("sender")
    node.connect("other")
    node.subscribe("sender", channel)
    node.subscribe("other", channel)
    api.trigger(channel, "first", {"n": 1}, socket_id=sender)
    api.trigger(channel, "second", {"n": 2})
    node.wait_event("other", "first", channel)
    node.wait_event("sender", "second", channel)  # delivered in order: "first" was skipped
    assert [e["event"] for e in node.events("sender", channel=channel)
            if not e["event"].startswith("pusher:")] == ["second"]


def test_trigger_batch(api, raw):
    client = raw()
    connected(client)
    first, second = f"ba-{uid()}", f"bb-{uid()}"
    subscribe(client, api, first)
    subscribe(client, api, second)
    assert api.trigger_batch([{"channel": first, "name": "one", "data": {"x": 1}},
                              {"channel": second, "name": "two", "data": "plain"}]) == {}
    one, two = client.recv_event("one"), client.recv_event("two")
    assert (one["channel"], json.loads(one["data"])) == (first, {"x": 1})
    assert (two["channel"], two["data"]) == (second, "plain")


def test_channels_info_lists_occupied_channels_with_prefix_and_user_count(api, raw):
    tag = uid()
    room_a, room_b = f"presence-{tag}-a", f"presence-{tag}-b"
    raw_member(raw, api, room_a, "u1")
    raw_member(raw, api, room_a, "u1")  # same user twice: one user
    raw_member(raw, api, room_a, "u2")
    raw_member(raw, api, room_b, "u3")
    public = raw()
    connected(public)
    subscribe(public, api, f"{tag}-pub")
    subscribe(public, api, f"{tag}-gone")
    public.send({"event": "pusher:unsubscribe", "data": {"channel": f"{tag}-gone"}})
    # the unsubscribe is handled before this subscribe is answered
    subscribe(public, api, f"{tag}-pub2")

    assert api.channels_info(f"presence-{tag}", ["user_count"]) == {
        "channels": {room_a: {"user_count": 2}, room_b: {"user_count": 1}}}
    assert api.channels_info(f"{tag}-") == {"channels": {f"{tag}-pub": {}, f"{tag}-pub2": {}}}
    everything = api.channels_info()["channels"]
    assert {room_a, room_b, f"{tag}-pub"} <= set(everything)
    assert f"{tag}-gone" not in everything


def test_channel_info_counts(api, raw):
    room = f"presence-{uid()}"
    raw_member(raw, api, room, "u1")
    raw_member(raw, api, room, "u1")
    raw_member(raw, api, room, "u2")
    assert api.channel_info(room, ["user_count", "subscription_count"]) == {
        "occupied": True, "user_count": 2, "subscription_count": 3}
    assert api.channel_info(room) == {"occupied": True}
    public = f"pub-{uid()}"
    assert api.channel_info(public)["occupied"] is False
    client = raw()
    connected(client)
    subscribe(client, api, public)
    assert api.channel_info(public, ["subscription_count"]) == {
        "occupied": True, "subscription_count": 1}


def test_users_info(api, raw):
    room = f"presence-{uid()}"
    for user in ("u1", "u2", "u1"):
        raw_member(raw, api, room, user)
    users = api.users_info(room)["users"]
    assert sorted(users, key=lambda u: u["id"]) == [{"id": "u1"}, {"id": "u2"}]


def test_send_to_user(api, raw):
    user = f"user-{uid()}"
    client = raw()
    sign_in(client, api, connected(client), user)
    assert api.send_to_user(user, "note", {"hello": user}) == {}
    event = client.recv_event("note")
    assert event["channel"] == f"#server-to-user-{user}"
    assert json.loads(event["data"]) == {"hello": user}


def test_terminate_user_connections(api, raw):
    user, bystander = f"user-{uid()}", f"user-{uid()}"
    first, second, other = raw(), raw(), raw()
    for client, who in ((first, user), (second, user), (other, bystander)):
        sign_in(client, api, connected(client), who)
    assert api.terminate_user_connections(user) == {}
    for client in (first, second):
        assert client.recv_event("pusher:error")["data"]["code"] == 4009
        assert client.recv_close()[0] == 4009
    assert_alive(other)


def test_pypi_library_errors(api):
    with pytest.raises(pusher.errors.PusherBadRequest, match="presence-"):
        api.channels_info("private-", ["user_count"])
    with pytest.raises(pusher.errors.PusherBadRequest, match="presence"):
        api.channel_info(f"public-{uid()}", ["user_count"])
    with pytest.raises(pusher.errors.PusherBadRequest, match="cache"):
        api.channel_info(f"private-{uid()}", ["cache"])
    with pytest.raises(pusher.errors.PusherBadRequest, match="presence"):
        api.users_info(f"private-{uid()}")


def test_bad_credentials(server, api):
    wrong = pusher.Pusher(app_id=APP_ID, key=KEY, secret="not-the-secret", host=server.host,
                          port=server.port, ssl=False)
    with pytest.raises(pusher.errors.PusherBadAuth):
        wrong.trigger("c", "e", {})
    response = signed_request(server, "POST", "/apps/1/events",
                              {"name": "e", "channel": "c", "data": "{}"}, secret="wrong")
    assert response.status_code == 401 and "signature" in response.json()["error"]
    assert_signatures_kept(response)
    assert signed_request(server, "GET", "/apps/999/channels").status_code == 404
    assert signed_request(server, "GET", "/apps/1/nowhere").status_code == 404


# ------------------------------------------------------------------ npm `pusher`

def npm(node, method, *args):
    reply = node.call("api", method=method, args=list(args))
    assert reply["ok"], reply
    return reply["result"]


def npm_error(node, method, *args):
    reply = node.call("api", method=method, args=list(args), fails=True)
    return reply["status"], reply["body"]


def test_npm_trigger_with_info(node):
    room, public = f"presence-{uid()}", f"pub-{uid()}"
    node.connect("a", presence={"user_id": "ua", "user_info": {}})
    node.connect("b", presence={"user_id": "ub"})
    node.subscribe("a", room)
    node.subscribe("b", room)
    node.subscribe("a", public)
    result = npm(node, "trigger", [room, public], "ev", {"x": 1},
                 {"info": "user_count,subscription_count"})
    assert result == {"status": 200, "body": {"channels": {
        room: {"user_count": 2, "subscription_count": 2},
        public: {"subscription_count": 1}}}}
    assert npm(node, "trigger", public, "ev", "s") == {"status": 200, "body": {}}
    assert node.wait_event("b", "ev", room)["data"] == {"x": 1}


def test_npm_trigger_excludes_socket_id(node):
    channel = f"ex-{uid()}"
    sender = node.connect("sender")
    node.connect("other")
    node.subscribe("sender", channel)
    node.subscribe("other", channel)
    npm(node, "trigger", channel, "first", {}, {"socket_id": sender})
    npm(node, "trigger", channel, "second", {})
    node.wait_event("other", "first", channel)
    node.wait_event("sender", "second", channel)
    assert not node.events("sender", "first", channel)


def test_npm_trigger_batch_with_info(node):
    room, public = f"presence-{uid()}", f"pub-{uid()}"
    node.connect("a", presence={"user_id": "ua"})
    node.subscribe("a", room)
    node.subscribe("a", public)
    result = npm(node, "triggerBatch", [
        {"channel": room, "name": "one", "data": {"n": 1}, "info": "user_count"},
        {"channel": public, "name": "two", "data": {"n": 2}},
        {"channel": public, "name": "three", "data": "x", "info": "subscription_count"}])
    assert result == {"status": 200, "body": {"batch": [
        {"user_count": 1}, {}, {"subscription_count": 1}]}}
    assert node.wait_event("a", "three", public)["data"] == "x"
    assert npm(node, "triggerBatch", [{"channel": public, "name": "four", "data": {}}]) == {
        "status": 200, "body": {}}


def test_npm_get_channels_channel_and_users(node):
    tag = uid()
    room, public = f"presence-{tag}", f"{tag}-pub"
    node.connect("a", presence={"user_id": "ua"})
    node.connect("b", presence={"user_id": "ub"})
    node.subscribe("a", room)
    node.subscribe("b", room)
    node.subscribe("b", public)
    assert npm(node, "get", {"path": "/channels",
                             "params": {"filter_by_prefix": room, "info": "user_count"}}) == {
        "status": 200, "body": {"channels": {room: {"user_count": 2}}}}
    assert npm(node, "get", {"path": "/channels", "params": {"filter_by_prefix": tag}}) == {
        "status": 200, "body": {"channels": {public: {}}}}
    assert npm(node, "get", {"path": f"/channels/{room}",
                             "params": {"info": "user_count,subscription_count"}}) == {
        "status": 200, "body": {"occupied": True, "user_count": 2, "subscription_count": 2}}
    users = npm(node, "get", {"path": f"/channels/{room}/users"})["body"]["users"]
    assert sorted(u["id"] for u in users) == ["ua", "ub"]
    # refusals: user_count without a presence- prefix, attributes that do not fit the kind,
    # users of a channel that is not presence
    status, body = npm_error(node, "get", {"path": "/channels",
                                           "params": {"info": "user_count"}})
    assert status == 400 and "presence-" in body["error"]
    status, body = npm_error(node, "get", {"path": f"/channels/{public}",
                                           "params": {"info": "user_count"}})
    assert status == 400 and "presence" in body["error"]
    status, body = npm_error(node, "get", {"path": f"/channels/{public}/users"})
    assert status == 400 and "presence" in body["error"]


def test_npm_send_to_user_and_terminate(node):
    user = f"user-{uid()}"
    node.connect("a", user={"id": user})
    node.connect("b", user={"id": f"other-{uid()}"})
    node.call("signin", id="a")
    node.call("signin", id="b")
    # pusher-js subscribes to #server-to-user-<id> by itself once signed in: send until
    # that subscription is in place
    def delivered():
        assert npm(node, "sendToUser", user, "note", {"hi": 1}) == {"status": 200, "body": {}}
        return [r for r in list(node.reports) if r.get("type") == "user_event" and r["id"] == "a"
                and r["event"] == "note"]
    assert wait_until(delivered, interval=0.1, message="user event")[0]["data"] == {"hi": 1}
    assert npm(node, "terminateUserConnections", user) == {"status": 200, "body": {}}
    node.wait(lambda r: r.get("type") == "error" and r["id"] == "a"
              and "4009" in json.dumps(r["error"]), what="4009 on a")
    assert node.call("state", id="b")["result"] == "connected"


# ------------------------------------------------------------------ limits (raw requests)

def trigger_raw(server, **body):
    return signed_request(server, "POST", f"/apps/{APP_ID}/events", body)


def test_limit_channels_per_event(server):
    ok = trigger_raw(server, name="e", data="{}", channels=[f"c{i}" for i in range(100)])
    assert ok.status_code == 200, ok.text
    refused = trigger_raw(server, name="e", data="{}", channels=[f"c{i}" for i in range(101)])
    assert refused.status_code == 400 and "100" in refused.json()["error"]


def test_limit_batch_size(server):
    batch = [{"name": "e", "channel": "c", "data": "{}"}] * 10
    path = "/apps/1/batch_events"
    assert signed_request(server, "POST", path, {"batch": batch}).status_code == 200
    refused = signed_request(server, "POST", path, {"batch": batch + batch[:1]})
    assert refused.status_code == 400
    assert "batch" in refused.json()["error"] and "10" in refused.json()["error"]


def test_limit_data_size_in_bytes(server):
    assert trigger_raw(server, name="e", channel="c", data="x" * 10240).status_code == 200
    for data in ("x" * 10241, "é" * 5121):  # 5121 characters, 10242 bytes
        refused = trigger_raw(server, name="e", channel="c", data=data)
        assert refused.status_code == 413 and "10240" in refused.json()["error"]
    batch = [{"name": "e", "channel": "c", "data": "{}"},
             {"name": "e", "channel": "c", "data": "x" * 10241}]
    refused = signed_request(server, "POST", "/apps/1/batch_events", {"batch": batch})
    assert refused.status_code == 413 and "batch[1]" in refused.json()["error"]


def test_limit_event_and_channel_name_length(server):
    assert trigger_raw(server, name="e" * 200, channel="c" * 200, data="{}").status_code == 200
    refused = trigger_raw(server, name="e" * 201, channel="c", data="{}")
    assert refused.status_code == 400
    assert "Event name" in refused.json()["error"] and "200" in refused.json()["error"]
    refused = trigger_raw(server, name="e", channel="c" * 201, data="{}")
    assert refused.status_code == 400
    assert "channel name" in refused.json()["error"] and "200" in refused.json()["error"]


def test_malformed_requests(server):
    response = requests.post(server.url + "/apps/1/events", data=b"{", timeout=5)
    assert response.status_code == 401  # unsigned: refused before the body is read
    response = signed_request(server, "POST", "/apps/1/events", b"{")
    assert response.status_code == 400 and "JSON" in response.json()["error"]
    assert trigger_raw(server, name="e", data="{}").status_code == 400  # no channel
    assert trigger_raw(server, name="e", channel="bad name!", data="{}").status_code == 400


def test_per_app_limits_from_apps_file(start_server, tmp_path):
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps([{"id": "7", "key": "key7", "secret": "secret7",
                                 "max_event_data_size": 100, "max_channels_per_event": 2,
                                 "max_batch_size": 2, "max_event_name_length": 10,
                                 "max_channel_name_length": 20}]))
    server = start_server(env={"BUNPULSE_APPS_FILE": str(apps)})

    def call(path, body):
        return signed_request(server, "POST", path, body, key="key7", secret="secret7")

    assert call("/apps/7/events", {"name": "e", "channel": "c", "data": "x" * 100}) \
        .status_code == 200
    refused = call("/apps/7/events", {"name": "e", "channel": "c", "data": "x" * 101})
    assert refused.status_code == 413 and "100 bytes" in refused.json()["error"]
    refused = call("/apps/7/events", {"name": "e", "channels": ["a", "b", "c"], "data": "{}"})
    assert refused.status_code == 400 and "2" in refused.json()["error"]
    refused = call("/apps/7/batch_events", {"batch": [{"name": "e", "channel": "c",
                                                       "data": "{}"}] * 3})
    assert refused.status_code == 400 and "2" in refused.json()["error"]
    refused = call("/apps/7/events", {"name": "e" * 11, "channel": "c", "data": "{}"})
    assert refused.status_code == 400 and "10" in refused.json()["error"]
    refused = call("/apps/7/events", {"name": "e", "channel": "c" * 21, "data": "{}"})
    assert refused.status_code == 400 and "20" in refused.json()["error"]
    # the environment's app keeps the default limits on the same server
    big = signed_request(server, "POST", "/apps/1/events",
                         {"name": "e", "channel": "c", "data": "x" * 10240})
    assert big.status_code == 200
    # and the PyPI library works against the second app
    client = pusher.Pusher(app_id="7", key="key7", secret="secret7", host=server.host,
                           port=server.port, ssl=False)
    assert client.trigger("c", "e", "x" * 100) == {}
    with pytest.raises(pusher.errors.PusherError):
        client.trigger("c", "e", "x" * 101)


def test_percent_encoded_channel_path_is_verified_as_sent(node, api):
    """The npm library signs the path it sends; a percent-encoded channel name must pass."""
    node.connect("enc")
    node.subscribe("enc", "private-a=b@c")
    reply = node.call("api", method="get", args=[{"path": "/channels/private-a%3Db%40c",
                                                  "params": {"info": "subscription_count"}}])
    assert reply["ok"], reply
    assert reply["result"]["status"] == 200
    assert reply["result"]["body"] == {"occupied": True, "subscription_count": 1}


# ------------------------------------------------------------------ the canonical query

def sent_signed(server, pairs, path=f"/apps/{APP_ID}/channels", headers=None):
    """GET `path` with the query `pairs` exactly as given (raw key, raw value), signed over
    what a lenient reading of it gives (keys lower-cased, values decoded, the first of each
    key): the signature is right, only the query's form is not canonical."""
    now = str(int(time.time()))
    query = "&".join(f"{k}={v}" for k, v in [*pairs, ("auth_key", KEY),
                                             ("auth_timestamp", now), ("auth_version", "1.0")])
    signature = sign_api_request(SECRET, "GET", path, query_params({"QUERY_STRING": query}))
    request = requests.Request("GET", server.url + path, headers=headers).prepare()
    request.url += f"?{query}&auth_signature={signature}"  # as is: requests would unescape %5F
    with requests.Session() as session:
        return session.send(request, timeout=5)


def test_a_captured_signature_cannot_be_replayed_with_another_meaning(server, api, raw):
    """Issue 21, item 6: a signed `filter_by_prefix=presence-&info=user_count` still verified
    with the keys upper-cased, folded into one encoded key, repeated, or with an encoded '&'
    in a value, and the handler then read another query (listing every channel)."""
    tag = uid()
    raw_member(raw, api, f"presence-{tag}", "u1")
    public = raw()
    connected(public)
    subscribe(public, api, f"{tag}-public")
    canonical = sent_signed(server, [("filter_by_prefix", "presence-"), ("info", "user_count")])
    assert canonical.status_code == 200, canonical.text
    assert f"{tag}-public" not in canonical.json()["channels"]
    assert canonical.json()["channels"][f"presence-{tag}"] == {"user_count": 1}
    served = []
    for pairs, why in [
            ([("FILTER_BY_PREFIX", "presence-"), ("INFO", "user_count")], "lower-case"),
            ([("filter_by_prefix", "presence-"), ("Info", "user_count")], "lower-case"),
            ([("filter_by_prefix%3Dpresence-%26info", "user_count")], "plain lower-case"),
            ([("filter_by_prefix", "presence-%26info%3Duser_count")], "'&'"),
            ([("filter_by_prefix", "presence-"), ("info", "user_count"),
              ("filter_by_prefix", "")], "more than once"),
            ([("filter%5Fby%5Fprefix", "presence-"), ("info", "user_count")], "plain")]:
        refused = sent_signed(server, pairs)
        if refused.status_code != 401 or "Non-canonical query" not in refused.text \
                or why not in refused.json()["error"]:
            served.append((pairs, refused.status_code, refused.text[:120]))
        assert_signatures_kept(refused)
    assert not served, f"served with another meaning: {served}"
    # With a bearer token too: what is read is what was meant, or nothing.
    refused = requests.get(f"{server.url}/apps/{APP_ID}/channels?FILTER_BY_PREFIX=presence-",
                           headers={"Authorization": f"Bearer {SECRET}"}, timeout=5)
    assert refused.status_code == 401 and "lower-case" in refused.json()["error"]


def test_both_official_libraries_send_canonical_queries(api, node, raw):
    room = f"presence-{uid()}"
    raw_member(raw, api, room, "u1")
    assert api.channels_info(room, ["user_count"]) == {"channels": {room: {"user_count": 1}}}
    assert api.channel_info(room, ["user_count", "subscription_count"])["user_count"] == 1
    assert npm(node, "get", {"path": "/channels", "params": {"filter_by_prefix": room,
                                                             "info": "user_count"}}) == {
        "status": 200, "body": {"channels": {room: {"user_count": 1}}}}
    assert npm(node, "trigger", room, "ev", {"x": 1}, {"info": "user_count"})["status"] == 200
