"""User authentication, server-to-user events, terminations and watchlists (protocol reference,
section 6), with pusher-js and both server libraries."""
import json

import pytest

from conftest import assert_alive, connected, raw_signin, raw_subscribe, wait_until

BYE = {"event": "pusher:error", "data": {"code": 4009,
                                         "message": "You got disconnected by the app."}}


def message(node, id, event, channel=None):
    """Wait for a frame that pusher-js client `id` received."""
    return node.wait(lambda r: r.get("type") == "message" and r["id"] == id
                     and r["event"] == event and (channel is None or r["channel"] == channel),
                     what=f"{event} on {id}")


def signin(node, id, user):
    """Connect pusher-js client `id` as `user` and sign in; return its socket id once it is
    subscribed to its #server-to-user channel."""
    socket_id = node.connect(id, user=user)
    node.call("signin", id=id)
    success = message(node, id, "pusher:signin_success")
    assert json.loads(success["data"]["user_data"])["id"] == user["id"]
    message(node, id, "pusher_internal:subscription_succeeded", "#server-to-user-" + user["id"])
    return socket_id


def raw_user(raw, user_id, watchlist=None, target=None):
    client = raw(target=target) if target else raw()
    user = {"id": user_id} if watchlist is None else {"id": user_id, "watchlist": watchlist}
    user_data = raw_signin(client, connected(client), user)
    assert client.recv() == {"event": "pusher:signin_success", "data": {"user_data": user_data}}
    return client


def watch_events(node, id):
    return [(r["name"], r["user_ids"]) for r in node.reports
            if r.get("type") == "watchlist" and r["id"] == id]


# ------------------------------------------------------------------------ sign-in

def test_pusher_js_signin_succeeds(node):
    signin(node, "a", {"id": "1", "user_info": {"name": "A"}})
    assert node.call("state", id="a")["result"] == "connected"


def test_raw_signin_success_frame(raw):
    client = raw()
    user_data = raw_signin(client, connected(client), {"id": "7", "user_info": {"n": 1}})
    assert client.recv() == {"event": "pusher:signin_success",
                             "data": {"user_data": user_data}}


@pytest.mark.parametrize("case", ["bad-signature", "no-id", "not-json", "no-auth"])
def test_bad_signin_is_refused_with_4009(raw, case):
    client = raw()
    socket_id = connected(client)
    if case == "bad-signature":
        raw_signin(client, socket_id, {"id": "1"}, secret="wrong")
    elif case == "no-id":
        raw_signin(client, socket_id, {"name": "x"})
    elif case == "not-json":
        raw_signin(client, socket_id, "not json")
    else:
        client.send({"event": "pusher:signin", "data": {"user_data": '{"id":"1"}'}})
    error = client.recv()
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4009
    assert "test-secret" not in json.dumps(error)
    assert client.recv_close()[0] == 4009


def test_second_signin_on_a_connection_is_refused(raw, api):
    # Else the connection would keep the first user's #server-to-user channel and its events.
    client = raw()
    socket_id = connected(client)
    raw_signin(client, socket_id, {"id": "first"})
    client.recv_event("pusher:signin_success")
    raw_subscribe(client, None, "#server-to-user-first")
    client.recv_event("pusher_internal:subscription_succeeded")
    raw_signin(client, socket_id, {"id": "second"})
    error = client.recv()
    assert error["event"] == "pusher:error" and "signed in" in error["data"]["message"]
    api.send_to_user("first", "still-first", {})
    assert client.recv()["event"] == "still-first"
    raw_subscribe(client, None, "#server-to-user-second")
    assert client.recv()["event"] == "pusher:subscription_error"


def test_server_to_user_channel_is_only_for_that_user(raw):
    one = raw_user(raw, "1")
    raw_subscribe(one, None, "#server-to-user-1")
    assert one.recv() == {"event": "pusher_internal:subscription_succeeded",
                          "channel": "#server-to-user-1", "data": "{}"}
    anonymous = raw()
    connected(anonymous)
    other = raw_user(raw, "2")
    for client in (anonymous, other):
        raw_subscribe(client, None, "#server-to-user-1")
        error = client.recv()
        assert error["event"] == "pusher:subscription_error"
        assert error["channel"] == "#server-to-user-1" and error["data"]["status"] == 403
        assert_alive(client)


# ------------------------------------------------------------------------ sendToUser

def test_send_to_user_reaches_every_tab_of_that_user_only(node):
    signin(node, "tab1", {"id": "u1"})
    signin(node, "tab2", {"id": "u1"})
    signin(node, "other", {"id": "u2"})
    reply = node.call("api", method="sendToUser", args=["u1", "hello", {"x": 1}])
    assert reply["ok"], reply
    for id in ("tab1", "tab2"):
        event = node.wait(lambda r, id=id: r.get("type") == "user_event" and r["id"] == id
                          and r["event"] == "hello")
        assert event["data"] == {"x": 1}
    node.call("api", method="sendToUser", args=["u2", "marker", {}])
    node.wait(lambda r: r.get("type") == "user_event" and r["id"] == "other"
              and r["event"] == "marker")
    assert [r for r in node.reports if r.get("type") == "user_event" and r["id"] == "other"
            and r["event"] == "hello"] == []


def test_send_to_user_with_the_pypi_library(raw, api):
    tabs = [raw_user(raw, "py-u") for _ in range(2)]
    for tab in tabs:
        raw_subscribe(tab, None, "#server-to-user-py-u")
        tab.recv_event("pusher_internal:subscription_succeeded")
    api.send_to_user("py-u", "hi", {"a": 1})
    for tab in tabs:
        assert tab.recv() == {"event": "hi", "channel": "#server-to-user-py-u",
                              "data": '{"a": 1}'}


# ------------------------------------------------------------------------ terminate

def test_terminate_with_the_npm_library(node, raw):
    signin(node, "t1", {"id": "doomed"})
    signin(node, "t2", {"id": "doomed"})
    signin(node, "safe", {"id": "kept"})
    raw_doomed = raw_user(raw, "doomed")
    raw_kept = raw_user(raw, "kept")
    reply = node.call("api", method="terminateUserConnections", args=["doomed"])
    assert reply["ok"], reply
    assert raw_doomed.recv() == BYE
    assert raw_doomed.recv_close() == (4009, "You got disconnected by the app.")
    for id in ("t1", "t2"):
        error = node.wait(lambda r, id=id: r.get("type") == "error" and r["id"] == id)
        assert error["error"]["data"] == BYE["data"]
        node.wait(lambda r, id=id: r.get("type") == "state" and r["id"] == id
                  and r["current"] == "disconnected")
    assert_alive(raw_kept)
    node.call("api", method="sendToUser", args=["kept", "still-here", {}])
    node.wait(lambda r: r.get("type") == "user_event" and r["id"] == "safe"
              and r["event"] == "still-here")
    assert node.call("state", id="safe")["result"] == "connected"


def test_terminate_with_the_pypi_library_unprefixed_path(raw, api):
    doomed = [raw_user(raw, "py-doomed") for _ in range(2)]
    kept = raw_user(raw, "py-kept")
    anonymous = raw()
    connected(anonymous)
    assert api.terminate_user_connections("py-doomed") == {}
    for client in doomed:
        assert client.recv() == BYE
        assert client.recv_close()[0] == 4009
    assert_alive(kept)
    assert_alive(anonymous)


# ------------------------------------------------------------------------ watchlists

def wait_gone(api, channel):
    """Wait until the server has processed the close of the only subscriber of channel."""
    wait_until(lambda: not api.channel_info(channel)["occupied"], 5,
               message=f"{channel} to be vacated")


def test_watchlist_online_and_offline(node, raw, api):
    signin(node, "x", {"id": "wx"})
    signin(node, "w", {"id": "watcher", "watchlist": ["wx", "wy"]})
    node.wait(lambda r: r.get("type") == "watchlist" and r["id"] == "w"
              and r["name"] == "offline")
    assert sorted(watch_events(node, "w")) == [("offline", ["wy"]), ("online", ["wx"])]

    y1 = raw_user(raw, "wy")  # the first connection of wy: online
    node.wait(lambda r: r.get("type") == "watchlist" and r["id"] == "w"
              and r["user_ids"] == ["wy"])
    raw_subscribe(y1, None, "track-y1")
    y1.recv_event("pusher_internal:subscription_succeeded")
    y2 = raw_user(raw, "wy")  # a second tab: no news
    y1.close()  # one tab left: still online
    wait_gone(api, "track-y1")
    node.call("disconnect", id="x")  # wx's last connection: offline
    node.wait(lambda r: r.get("type") == "watchlist" and r["id"] == "w"
              and r["user_ids"] == ["wx"] and r["name"] == "offline")
    y2.close()  # wy's last connection: offline
    wait_until(lambda: len(watch_events(node, "w")) >= 5, message="wy offline")
    assert watch_events(node, "w")[2:] == [("online", ["wy"]), ("offline", ["wx"]),
                                           ("offline", ["wy"])]


def test_watchlist_over_100_ids(raw):
    ids = [f"id-{n}" for n in range(150)]
    watcher = raw()
    user_data = raw_signin(watcher, connected(watcher), {"id": "big", "watchlist": ids})
    assert watcher.recv() == {"event": "pusher:signin_success",
                              "data": {"user_data": user_data}}
    error = watcher.recv()
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4302
    status = watcher.recv()
    assert status == {"event": "pusher_internal:watchlist_events",
                      "data": {"events": [{"name": "offline", "user_ids": ids[:100]}]}}
    raw_user(raw, "id-100")  # not watched: the 101st id
    raw_user(raw, "id-99")
    assert watcher.recv() == {"event": "pusher_internal:watchlist_events",
                              "data": {"events": [{"name": "online", "user_ids": ["id-99"]}]}}
    assert_alive(watcher)


# ------------------------------------------------------------------------ presence as the user

def test_presence_without_channel_data_uses_the_signed_in_user(node, raw):
    other = raw()
    raw_subscribe(other, connected(other), "presence-signed", json.dumps({"user_id": "o"}))
    other.recv_event("pusher_internal:subscription_succeeded")
    signin(node, "p", {"id": "pu", "user_info": {"name": "P"}})
    succeeded = node.subscribe("p", "presence-signed")
    assert succeeded["data"]["me"] == {"id": "pu", "info": {"name": "P"}}
    assert sorted(succeeded["data"]["ids"]) == ["o", "pu"]
    added = other.recv_event("pusher_internal:member_added")
    assert json.loads(added["data"]) == {"user_id": "pu", "user_info": {"name": "P"}}
