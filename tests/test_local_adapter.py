"""The local adapter in-process (one worker is the whole deployment): presence limits and
rosters, counts, delivery, watchlists and terminating a user. Real Hub, LocalAdapter and
Connection objects, each connection writing a real socket whose other end the test reads as its
client (conftest.SocketClient)."""
import json

import pytest

from bunpulse.adapters.local import LocalAdapter
from bunpulse.apps import App
from bunpulse.errors import PresenceFull
from bunpulse.frames import build_frame
from bunpulse.hub import Hub

APP = App(id="1", key="k1", secret="s1")


@pytest.fixture
def adapter():
    return LocalAdapter(Hub())


@pytest.fixture
def connect(adapter, socket_client):
    """connect(socket_id) -> the connection, added to the adapter; its client (the socket's
    other end) is `connect.clients[connection]`."""
    def add(socket_id):
        client = socket_client(APP, socket_id)
        adapter.add_connection(client.conn)
        clients[client.conn] = client
        return client.conn

    clients = add.clients = {}
    return add


def test_subscribe_reports_occupied_new_member_and_the_roster(adapter, connect):
    a, b = connect("1.1"), connect("1.2")
    assert adapter.subscribe(a, "public") == (True, False, None)
    assert adapter.subscribe(a, "presence-r", ("u1", {"n": 1})) == (True, True, {"u1": {"n": 1}})
    assert adapter.subscribe(b, "presence-r", ("u2", None)) == \
        (False, True, {"u1": {"n": 1}, "u2": None})
    assert adapter.unsubscribe(b, "presence-r") == ("presence-r", False, "u2")
    assert adapter.unsubscribe(b, "presence-r") is None


def test_presence_limit_refuses_new_users_but_not_known_ones(adapter, connect):
    conns = [connect(f"1.{n}") for n in range(5)]
    for n in range(3):
        adapter.subscribe(conns[n], "presence-small", (f"u{n}", {}), limit=3)
    with pytest.raises(PresenceFull):
        adapter.subscribe(conns[3], "presence-small", ("u3", {}), limit=3)
    assert "presence-small" not in conns[3].subscriptions  # refused: nothing recorded
    occupied, added, roster = adapter.subscribe(conns[4], "presence-small", ("u0", {}), limit=3)
    assert (occupied, added, sorted(roster)) == (False, False, ["u0", "u1", "u2"])
    assert adapter.member_count(APP.id, "presence-small") == 3
    assert adapter.subscription_count(APP.id, "presence-small") == 4


def test_counts_and_members(adapter, connect):
    a, b = connect("1.1"), connect("1.2")
    adapter.subscribe(a, "public")
    adapter.subscribe(b, "public")
    adapter.subscribe(a, "presence-r", ("u1", {"n": 1}))
    adapter.subscribe(b, "presence-r", ("u1", {"n": 1}))  # one user, two connections
    assert adapter.connection_count(APP.id) == 2
    assert adapter.channel_counts(APP.id) == {"public": (2, 0), "presence-r": (2, 1)}
    assert adapter.members(APP.id, "presence-r") == {"u1": {"n": 1}}
    assert adapter.subscription_count(APP.id, "nowhere") == 0
    assert adapter.members(APP.id, "nowhere") == {}
    assert adapter.member_count(APP.id, "nowhere") == 0


def test_publish_delivers_here_and_skips_the_sender(adapter, connect):
    a, b = connect("1.1"), connect("1.2")
    for conn in (a, b):
        adapter.subscribe(conn, "room")
    assert adapter.publish(APP.id, "room", build_frame(b"{}"), except_socket_id="1.1") == 1
    assert connect.clients[a].read().writes == [] and connect.clients[b].messages() == [b"{}"]


def test_remove_connection_reports_vacated_channels_and_the_user_offline(adapter, connect):
    conn = connect("1.1")
    adapter.subscribe(conn, "presence-r", ("u1", {}))
    conn.user_id = "u1"
    assert adapter.sign_in(conn, "u1") is True
    assert adapter.user_online(APP.id, "u1")
    assert adapter.remove_connection(conn) == ([("presence-r", True, "u1")], "u1")
    assert not adapter.user_online(APP.id, "u1") and adapter.connection_count(APP.id) == 0


def test_watchers_get_the_frame_and_terminate_closes_every_connection_of_the_user(
        adapter, connect):
    watcher, tab1, tab2, bystander = (connect(f"1.{n}") for n in range(1, 5))
    client = connect.clients
    adapter.watch(watcher, ["u1"])
    adapter.tell_watchers(APP.id, "u1", build_frame(b'{"online":1}'))
    assert client[watcher].messages() == [b'{"online":1}'] and client[tab1].frames() == []
    for tab in (tab1, tab2):
        tab.user_id = "u1"
        adapter.sign_in(tab, "u1")
    adapter.terminate_user(APP.id, "u1")
    for tab in (tab1, tab2):  # pusher:error 4009, a close frame 4009, and the socket ends
        (error,) = client[tab].messages()
        assert json.loads(error)["event"] == "pusher:error"
        assert json.loads(error)["data"]["code"] == 4009
        assert client[tab].close_code() == 4009 and client[tab].ended
    for other in (bystander, watcher):
        assert client[other].close_code() is None and not client[other].ended


def test_cache_channels_and_misses(adapter, connect):
    assert adapter.cache_get(APP.id, "cache-a") is None
    adapter.subscribe(connect("1.1"), "cache-a")
    assert adapter.first_cache_miss(APP.id, "cache-a") is True
    assert adapter.first_cache_miss(APP.id, "cache-a") is False
    adapter.cache_set(APP.id, "cache-a", "e", "d", 60)
    assert adapter.cache_get(APP.id, "cache-a")[:2] == ("e", "d")
