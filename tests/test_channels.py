"""Channels with the official clients (pusher-js and the PyPI library) and raw frames where
an exact frame matters: delivery, refused auth, the presence roster, the presence limit,
unsubscribe, socket_id exclusion and cleanup after disconnect."""
import json

import pytest

from bunpulse.apps import App
from bunpulse.signatures import channel_auth
from conftest import KEY, SECRET, connected, raw_subscribe, until_pong, wait_until

TEST_APP = App(id="1", key=KEY, secret=SECRET)


def member(user_id, name=None):
    return {"user_id": user_id, "user_info": {"name": name or f"user {user_id}"}}


def channel_counts(api, channel):
    return api.channel_info(channel, ["subscription_count"])["subscription_count"]


# ---------------------------------------------------------------- delivery

def test_public_private_and_presence_channels_receive_events(node, api):
    node.connect("a", presence=member("1"))
    channels = ["deliver-pub", "private-deliver", "presence-deliver"]
    for channel in channels:
        node.subscribe("a", channel)
    api.trigger(channels, "my-event", {"message": "hello", "n": 1})
    for channel in channels:
        event = node.wait_event("a", "my-event", channel)
        assert event["data"] == {"message": "hello", "n": 1}


def test_string_data_reaches_pusher_js_as_sent(node, api):
    node.connect("a")
    node.subscribe("a", "deliver-string")
    api.trigger("deliver-string", "plain", "just text, not JSON")
    assert node.wait_event("a", "plain")["data"] == "just text, not JSON"


def test_raw_frame_of_a_published_event(raw, api):
    client = raw()
    socket_id = connected(client)
    raw_subscribe(client, socket_id, "private-raw-frame")
    assert client.recv_event("pusher_internal:subscription_succeeded") == {
        "event": "pusher_internal:subscription_succeeded", "channel": "private-raw-frame",
        "data": "{}"}
    api.trigger("private-raw-frame", "my-event", {"message": "hello world"})
    event = client.recv_event("my-event")
    # The PyPI library serializes with json.dumps: its string is forwarded byte for byte.
    assert event == {"event": "my-event", "channel": "private-raw-frame",
                     "data": '{"message": "hello world"}'}


# ---------------------------------------------------------------- refused auth

def test_bad_private_auth_with_pusher_js(node_for, server, api):
    wrong = node_for(server, secret="not-the-secret")
    wrong.connect("w")
    wrong.call("subscribe", id="w", channel="private-refused")
    error = wrong.wait_event("w", "pusher:subscription_error", "private-refused")
    assert error["data"]["type"] == "AuthError" and error["data"]["status"] == 401
    assert isinstance(error["data"]["error"], str)
    assert channel_counts(api, "private-refused") == 0
    # The connection is still usable.
    wrong.subscribe("w", "public-after-refusal")


@pytest.mark.parametrize("channel, channel_data", [
    ("private-bad-auth", None),
    ("private-encrypted-bad-auth", None),
    ("presence-bad-auth", json.dumps(member("1"))),
])
def test_bad_auth_frames_never_contain_the_signature(raw, channel, channel_data):
    client = raw()
    socket_id = connected(client)
    expected = channel_auth(TEST_APP, socket_id, channel, channel_data)
    signature = expected.split(":", 1)[1]
    data = {"channel": channel, "auth": f"{KEY}:{'0' * 64}"}
    if channel_data is not None:
        data["channel_data"] = channel_data
    client.send({"event": "pusher:subscribe", "data": data})
    first, second = client.recv(), client.recv()
    assert first["event"] == "pusher:subscription_error"
    assert first["channel"] == channel
    assert set(first["data"]) == {"type", "error", "status"}
    assert first["data"]["type"] == "AuthError" and first["data"]["status"] == 401
    assert second["event"] == "pusher:error"
    assert isinstance(second["data"]["message"], str) and second["data"]["message"]
    for frame in (first, second):
        assert signature not in json.dumps(frame)
    # The right signature still works on the same connection.
    raw_subscribe(client, socket_id, channel, channel_data)
    assert client.recv_event("pusher_internal:subscription_succeeded")["channel"] == channel


@pytest.mark.parametrize("auth", [None, "", "garbage", f"{KEY}:", f"other-key:{'0' * 64}"])
def test_missing_or_malformed_private_auth(raw, auth):
    client = raw()
    connected(client)
    data = {"channel": "private-malformed-auth"}
    if auth is not None:
        data["auth"] = auth
    client.send({"event": "pusher:subscribe", "data": data})
    error = client.recv_event("pusher:subscription_error")
    assert error["channel"] == "private-malformed-auth" and error["data"]["status"] == 401
    client.recv_event("pusher:error")


@pytest.mark.parametrize("channel_data, status", [
    (json.dumps({"user_id": "u" * 129}), 400),
    (json.dumps({"user_id": "1", "user_info": {"x": "y" * 1100}}), 400),
    ("not json", 400),
    (json.dumps({"user_info": {}}), 400),
])
def test_invalid_presence_data_is_refused(raw, channel_data, status):
    client = raw()
    socket_id = connected(client)
    raw_subscribe(client, socket_id, "presence-invalid-data", channel_data)
    error = client.recv_event("pusher:subscription_error")
    assert error["channel"] == "presence-invalid-data"
    assert error["data"]["status"] == status
    client.recv_event("pusher:error")


def test_invalid_channel_name_is_refused(raw):
    client = raw()
    connected(client)
    for name in ("x" * 201, "bad name", "#server-to-user-nobody", ""):
        client.send({"event": "pusher:subscribe", "data": {"channel": name}})
        error = client.recv_event("pusher:subscription_error")
        assert error["channel"] == name and error["data"]["status"] in (400, 403)
        client.recv_event("pusher:error")


# ---------------------------------------------------------------- presence roster

def presence_events(node, id, event, channel):
    return [e["data"] for e in node.events(id, event, channel)]


def barrier(node, api, channel, ids, mark):
    """Everything the server sent before this point has reached these clients."""
    api.trigger(channel, "mark", {"mark": mark})
    for id in ids:
        node.wait(lambda r, id=id: r.get("type") == "event" and r["id"] == id
                  and r["event"] == "mark" and r["data"] == {"mark": mark}, 10, f"mark on {id}")


@pytest.mark.parametrize("leave", ["unsubscribe", "disconnect"])
def test_presence_roster_with_two_users_and_two_tabs(node, api, leave):
    channel = f"presence-roster-{leave}"
    node.connect("a", presence=member("1", "alice"))
    node.connect("b", presence=member("2", "bob"))
    node.connect("a2", presence=member("1", "alice"))

    joined = node.subscribe("a", channel)["data"]
    assert joined["count"] == 1 and joined["ids"] == ["1"] and joined["me"]["id"] == "1"

    joined = node.subscribe("b", channel)["data"]
    assert joined["count"] == 2 and sorted(joined["ids"]) == ["1", "2"]
    assert joined["members"]["1"] == {"name": "alice"}
    added = node.wait_event("a", "pusher:member_added", channel)["data"]
    assert added == {"id": "2", "info": {"name": "bob"}}

    # A second tab of user 1: counted once, announced to nobody.
    joined = node.subscribe("a2", channel)["data"]
    assert joined["count"] == 2 and sorted(joined["ids"]) == ["1", "2"]
    info = api.channel_info(channel, ["user_count", "subscription_count"])
    assert (info["user_count"], info["subscription_count"]) == (2, 3)
    assert sorted(u["id"] for u in api.users_info(channel)["users"]) == ["1", "2"]
    barrier(node, api, channel, ["a", "b", "a2"], 1)
    assert presence_events(node, "b", "pusher:member_added", channel) == []
    assert presence_events(node, "a", "pusher:member_added", channel) == [added]
    assert presence_events(node, "a2", "pusher:member_added", channel) == []

    # The first tab leaves: user 1 is still there.
    node.call(leave, id="a2", **({"channel": channel} if leave == "unsubscribe" else {}))
    wait_until(lambda: channel_counts(api, channel) == 2, message="a2 gone")
    barrier(node, api, channel, ["a", "b"], 2)
    assert presence_events(node, "b", "pusher:member_removed", channel) == []
    assert node.call("members", id="b", channel=channel)["result"]["count"] == 2

    # The last tab leaves: user 1 is removed, once.
    node.call(leave, id="a", **({"channel": channel} if leave == "unsubscribe" else {}))
    removed = node.wait_event("b", "pusher:member_removed", channel)["data"]
    assert removed == {"id": "1", "info": {"name": "alice"}}
    barrier(node, api, channel, ["b"], 3)
    assert len(presence_events(node, "b", "pusher:member_removed", channel)) == 1
    assert api.channel_info(channel, ["user_count"])["user_count"] == 1
    assert [u["id"] for u in api.users_info(channel)["users"]] == ["2"]


def test_presence_frames_on_the_wire(raw, api):
    channel = "presence-wire"
    observer = raw()
    observer_id = connected(observer)
    raw_subscribe(observer, observer_id, channel, json.dumps(member("obs")))
    roster = json.loads(observer.recv_event("pusher_internal:subscription_succeeded")["data"])
    assert roster == {"presence": {"ids": ["obs"], "hash": {"obs": {"name": "user obs"}},
                                   "count": 1}}

    tabs = []
    for _ in range(2):
        tab = raw()
        tab_id = connected(tab)
        raw_subscribe(tab, tab_id, channel, json.dumps({"user_id": 7, "user_info": {"n": 7}}))
        roster = json.loads(tab.recv_event("pusher_internal:subscription_succeeded")["data"])
        assert roster["presence"]["count"] == 2
        assert sorted(roster["presence"]["ids"]) == ["7", "obs"]  # numeric id keyed as string
        tabs.append(tab)
    api.trigger(channel, "mark", {})
    for tab in tabs:  # the joiners get no member_added, for themselves or each other
        assert tab.recv()["event"] == "mark"
    added = observer.recv()
    assert added == {"event": "pusher_internal:member_added", "channel": channel,
                     "data": '{"user_id":"7","user_info":{"n":7}}'}
    assert observer.recv()["event"] == "mark"  # only one member_added for two tabs

    tabs[0].close()
    wait_until(lambda: channel_counts(api, channel) == 2, message="first tab gone")
    api.trigger(channel, "mark", {})
    assert observer.recv()["event"] == "mark"
    tabs[1].send({"event": "pusher:unsubscribe", "data": {"channel": channel}})
    assert observer.recv() == {"event": "pusher_internal:member_removed", "channel": channel,
                               "data": '{"user_id":"7"}'}


# ---------------------------------------------------------------- presence limit

def test_presence_limit_is_100_users(raw, node, api):
    channel = "presence-full"
    clients = []
    for n in range(100):
        client = raw()
        raw_subscribe(client, connected(client), channel, json.dumps(member(f"u{n}")))
        clients.append(client)
    for client in clients:  # signed raw clients are all fine up to the limit
        client.recv_event("pusher_internal:subscription_succeeded")
    assert api.channel_info(channel, ["user_count"])["user_count"] == 100

    extra = raw()
    raw_subscribe(extra, connected(extra), channel, json.dumps(member("u100")))
    error = extra.recv_event("pusher:subscription_error")
    assert error["channel"] == channel
    assert error["data"]["status"] == 403 and "100" in error["data"]["error"]
    extra.recv_event("pusher:error")

    # pusher-js as the 101st user is refused too.
    node.connect("late", presence=member("u101"))
    node.call("subscribe", id="late", channel=channel)
    assert node.wait_event("late", "pusher:subscription_error", channel)["data"]["status"] == 403

    # Another tab of a member is not a new member.
    tab = raw()
    raw_subscribe(tab, connected(tab), channel, json.dumps(member("u0")))
    roster = json.loads(tab.recv_event("pusher_internal:subscription_succeeded")["data"])
    assert roster["presence"]["count"] == 100

    # Once somebody leaves there is room again.
    clients[5].close()
    wait_until(lambda: api.channel_info(channel, ["user_count"])["user_count"] == 99,
               message="u5 gone")
    again = raw()
    raw_subscribe(again, connected(again), channel, json.dumps(member("u100")))
    again.recv_event("pusher_internal:subscription_succeeded")


# ---------------------------------------------------------------- unsubscribe and exclusion

def test_unsubscribe_stops_delivery(raw, api):
    client = raw()
    socket_id = connected(client)
    for channel in ("unsub-a", "unsub-marker"):
        raw_subscribe(client, socket_id, channel)
        client.recv_event("pusher_internal:subscription_succeeded")
    client.send({"event": "pusher:unsubscribe", "data": {"channel": "unsub-a"}})
    assert until_pong(client) == []  # no reply to unsubscribe
    # One trigger, unsub-a first: had it been delivered, it would come before the marker.
    api.trigger(["unsub-a", "unsub-marker"], "ev", {})
    assert client.recv()["channel"] == "unsub-marker"
    assert api.channel_info("unsub-a")["occupied"] is False


def test_unsubscribe_with_pusher_js(node, api):
    node.connect("a")
    node.subscribe("a", "unsub-js")
    assert api.channel_info("unsub-js")["occupied"] is True
    node.call("unsubscribe", id="a", channel="unsub-js")
    wait_until(lambda: api.channel_info("unsub-js")["occupied"] is False,
               message="unsub-js vacated")


def test_trigger_excludes_socket_id(node, api):
    sender = node.connect("a")
    node.connect("b")
    for id in ("a", "b"):
        node.subscribe(id, "exclude-me")
    api.trigger("exclude-me", "first", {"n": 1}, socket_id=sender)
    api.trigger("exclude-me", "second", {"n": 2})
    node.wait_event("b", "first")
    node.wait_event("b", "second")
    node.wait_event("a", "second")  # sent after "first" on the same socket
    assert node.events("a", "first") == []


def test_trigger_exclusion_is_per_socket_on_the_wire(raw, api):
    a, b = raw(), raw()
    a_id, b_id = connected(a), connected(b)
    for client, socket_id in ((a, a_id), (b, b_id)):
        raw_subscribe(client, socket_id, "exclude-raw")
        client.recv_event("pusher_internal:subscription_succeeded")
    api.trigger(["exclude-raw"], "skip-a", {}, socket_id=a_id)
    api.trigger(["exclude-raw"], "all", {})
    assert a.recv()["event"] == "all"
    assert [b.recv()["event"], b.recv()["event"]] == ["skip-a", "all"]


# ---------------------------------------------------------------- cleanup

def test_everything_is_cleaned_up_after_disconnect(node, raw, api):
    node.connect("pub")
    node.connect("p1", presence=member("1"))
    node.connect("p2", presence=member("2"))
    node.connect("p1b", presence=member("1"))
    for id in ("pub", "p1", "p2", "p1b"):
        node.subscribe(id, "cleanup-public")
        node.subscribe(id, "private-cleanup")
        if id != "pub":
            node.subscribe(id, "presence-cleanup")
    abrupt = raw()
    socket_id = connected(abrupt)
    raw_subscribe(abrupt, socket_id, "cleanup-raw")
    raw_subscribe(abrupt, socket_id, "presence-cleanup", json.dumps(member("3")))
    abrupt.recv_event("pusher_internal:subscription_succeeded")
    abrupt.recv_event("pusher_internal:subscription_succeeded")
    channels = api.channels_info("")["channels"]
    assert {"cleanup-public", "private-cleanup", "presence-cleanup", "cleanup-raw"} <= \
        set(channels)
    assert api.channel_info("presence-cleanup", ["user_count"])["user_count"] == 3

    for id in ("pub", "p1", "p2", "p1b"):
        node.call("disconnect", id=id)
    abrupt.ws.sock.close()  # no close frame: the server must notice EOF
    wait_until(lambda: api.channels_info("")["channels"] == {}, timeout=10,
               message="no channel left")
    assert api.users_info("presence-cleanup")["users"] == []
    assert api.channel_info("presence-cleanup", ["user_count", "subscription_count"]) == {
        "occupied": False, "user_count": 0, "subscription_count": 0}
