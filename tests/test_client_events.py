"""Client events (protocol reference, section 4): relayed between subscribers of private and
presence channels, never back to the sender; every refusal is a pusher:error and the connection
stays open."""
import json

import pytest

from conftest import KEY, MASTER_KEY, assert_alive, connected, pusher_api, raw_subscribe, until_pong


def barrier(node, api, id, channel):
    """An HTTP event that `id` receives after everything sent to it before."""
    api.trigger(channel, "marker", {"n": 1})
    node.wait_event(id, "marker", channel)


def events_before_marker(client, channel, limit=100):
    """Read a raw client's events on channel up to the HTTP 'marker' event."""
    seen = []
    for _ in range(limit):
        message = client.recv()
        assert not isinstance(message, tuple), f"closed: {message}"
        if message.get("event") == "marker" and message.get("channel") == channel:
            return seen
        seen.append(message)
    raise AssertionError("no marker")


# ------------------------------------------------------------------------ pusher-js

def test_private_client_event_reaches_others_not_the_sender(node, api):
    for id in ("a", "b", "c"):
        node.connect(id)
        node.subscribe(id, "private-chat")
    reply = node.call("trigger", id="a", channel="private-chat", event="client-typing",
                      data={"text": "hi"})
    assert reply["ok"] and reply["result"]["sent"] is True
    for id in ("b", "c"):
        assert node.wait_event(id, "client-typing", "private-chat")["data"] == {"text": "hi"}
    barrier(node, api, "a", "private-chat")
    assert node.events("a", "client-typing") == []
    frame = node.wait(lambda r: r.get("type") == "message" and r["id"] == "b"
                      and r["event"] == "client-typing")
    assert frame.get("user_id") is None  # user_id belongs to presence channels only


def test_presence_client_event_carries_the_sender_user_id(node, api):
    node.connect("a", presence={"user_id": "u-a", "user_info": {"name": "A"}})
    node.connect("b", presence={"user_id": "u-b"})
    node.subscribe("a", "presence-room")
    node.subscribe("b", "presence-room")
    node.call("trigger", id="a", channel="presence-room", event="client-wave", data={"b": 2})
    frame = node.wait(lambda r: r.get("type") == "message" and r["id"] == "b"
                      and r["event"] == "client-wave")
    assert frame["user_id"] == "u-a" and frame["data"] == {"b": 2}
    assert node.wait_event("b", "client-wave", "presence-room")["data"] == {"b": 2}
    barrier(node, api, "a", "presence-room")
    assert node.events("a", "client-wave") == []


def test_raw_presence_client_event_frame(raw, api):
    a, b = raw(), raw()
    sid_a, sid_b = connected(a), connected(b)
    raw_subscribe(a, sid_a, "presence-raw", json.dumps({"user_id": 7}))
    a.recv_event("pusher_internal:subscription_succeeded")
    raw_subscribe(b, sid_b, "presence-raw", json.dumps({"user_id": "8"}))
    b.recv_event("pusher_internal:subscription_succeeded")
    a.recv_event("pusher_internal:member_added")
    a.send({"event": "client-x", "channel": "presence-raw", "data": {"b": 2}})
    frame = b.recv_event("client-x")
    assert frame == {"event": "client-x", "channel": "presence-raw", "data": {"b": 2},
                     "user_id": "7"}
    api.trigger("presence-raw", "marker", {})
    assert [m["event"] for m in events_before_marker(a, "presence-raw")] == []


# ------------------------------------------------------------------------ refusals (raw)

@pytest.mark.parametrize("channel", ["public-ce", "cache-ce", "private-encrypted-ce",
                                     "private-encrypted-cache-ce"])
def test_client_event_refused_on_public_and_encrypted_channels(raw, server, channel):
    api = pusher_api(server, encryption_master_key_base64=MASTER_KEY)
    sender, other = raw(), raw()
    for client in (sender, other):
        raw_subscribe(client, connected(client), channel)
        client.recv_event("pusher_internal:subscription_succeeded")
    sender.send({"event": "client-x", "channel": channel, "data": {"a": 1}})
    error = sender.recv_event("pusher:error")
    assert error["data"]["code"] is None and error["data"]["message"]
    assert_alive(sender)
    api.trigger(channel, "marker", {})
    assert [m["event"] for m in events_before_marker(other, channel)
            if m["event"].startswith("client-")] == []


def test_client_event_refused_when_not_subscribed(raw, api):
    sender, other = raw(), raw()
    connected(sender)
    raw_subscribe(other, connected(other), "private-notsub")
    other.recv_event("pusher_internal:subscription_succeeded")
    sender.send({"event": "client-x", "channel": "private-notsub", "data": {}})
    assert "not subscribed" in sender.recv_event("pusher:error")["data"]["message"]
    sender.send({"event": "client-x", "data": {}})  # no channel at all
    assert sender.recv_event("pusher:error")["data"]["message"]
    assert_alive(sender)
    api.trigger("private-notsub", "marker", {})
    assert events_before_marker(other, "private-notsub") == []


def test_client_event_refused_when_the_app_disables_them(start_server, raw):
    server = start_server(env={"BUNPULSE_CLIENT_EVENTS": "false"})
    sender = raw(target=server)
    other = raw(target=server)
    for client in (sender, other):
        raw_subscribe(client, connected(client), "private-off")
        client.recv_event("pusher_internal:subscription_succeeded")
    sender.send({"event": "client-x", "channel": "private-off", "data": {}})
    assert "not enabled" in sender.recv_event("pusher:error")["data"]["message"]
    assert_alive(sender)
    pusher_api(server).trigger("private-off", "marker", {})
    assert events_before_marker(other, "private-off") == []


def test_client_event_rate_limit_is_an_error_frame_never_a_close(raw, api):
    sender, other = raw(), raw()
    for client in (sender, other):
        raw_subscribe(client, connected(client), "private-rate")
        client.recv_event("pusher_internal:subscription_succeeded")
    sent = 25  # in well under a second: whatever the window, more than 10 fall in one second
    for n in range(sent):
        sender.send({"event": "client-n", "channel": "private-rate", "data": {"n": n}})
    errors = until_pong(sender)  # the connection is still open after all 25
    api.trigger("private-rate", "marker", {})
    assert errors and all(m == {"event": "pusher:error", "data": {
        "code": 4301, "message": "Client event rejected due to rate limit"}} for m in errors)
    delivered = events_before_marker(other, "private-rate")
    assert len(delivered) + len(errors) == sent
    assert 10 <= len(delivered) <= 20
    assert_alive(sender)


def test_client_events_are_not_cached(raw, api):
    sender, other = raw(), raw()
    for client in (sender, other):
        raw_subscribe(client, connected(client), "private-cache-ce")
        client.recv_event("pusher_internal:subscription_succeeded")
        client.recv_event("pusher:cache_miss")
    sender.send({"event": "client-x", "channel": "private-cache-ce", "data": {"a": 1}})
    assert other.recv_event("client-x")["data"] == {"a": 1}
    late = raw()
    raw_subscribe(late, connected(late), "private-cache-ce")
    late.recv_event("pusher_internal:subscription_succeeded")
    assert late.recv() == {"event": "pusher:cache_miss", "channel": "private-cache-ce"}
    info = api.channel_info("private-cache-ce", ["cache"])
    assert info["cache"] is None


# ------------------------------------------------------------------------ webhooks

def test_client_event_webhook(start_server, node_for, webhook_receiver):
    server = start_server(env={"BUNPULSE_WEBHOOK_URL": webhook_receiver.url,
                               "BUNPULSE_WEBHOOK_DELAY_MS": "0",
                               "BUNPULSE_WEBHOOK_BATCH_MS": "0"})
    node = node_for(server)
    sid_a = node.connect("a", presence={"user_id": "u-a"})
    node.connect("b", presence={"user_id": "u-b"})
    for channel in ("private-hook", "presence-hook"):
        node.subscribe("a", channel)
        node.subscribe("b", channel)
    node.call("trigger", id="a", channel="private-hook", event="client-p", data={"a": 1})
    node.call("trigger", id="a", channel="presence-hook", event="client-q", data=[1, "x"])
    hooks = webhook_receiver.wait_events("client_event", 2)
    by_event = {h["event"]: h for h in hooks}
    assert by_event["client-p"] == {"name": "client_event", "channel": "private-hook",
                                    "event": "client-p", "data": '{"a":1}',
                                    "socket_id": sid_a}
    assert by_event["client-q"] == {"name": "client_event", "channel": "presence-hook",
                                    "event": "client-q", "data": '[1,"x"]',
                                    "socket_id": sid_a, "user_id": "u-a"}
    # Signed so that the official library accepts it.
    request = next(r for r in webhook_receiver.requests
                   if b"client_event" in r["body"] and not r["failed"])
    check = node.call("webhook", headers={k.lower(): v for k, v in request["headers"].items()},
                      rawBody=request["body"].decode())
    assert check["result"]["valid"] is True
    assert KEY == request["headers"]["X-Pusher-Key"]
