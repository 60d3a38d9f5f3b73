"""The local adapter in-process (one worker is the whole deployment): presence limits and
rosters, counts, delivery, watchlists and terminating a user. Real Hub, LocalAdapter and
Connection objects; only the sockets record instead of sending."""
import json

import pytest

from bunpulse.adapters.local import LocalAdapter
from bunpulse.apps import App
from bunpulse.errors import PresenceFull
from bunpulse.hub import Hub
from conftest import recording_connection

APP = App(id="1", key="k1", secret="s1")


@pytest.fixture
def adapter():
    return LocalAdapter(Hub())


def connect(adapter, socket_id):
    conn = recording_connection(APP, socket_id)
    adapter.add_connection(conn)
    return conn


def test_subscribe_reports_occupied_new_member_and_the_roster(adapter):
    a, b = connect(adapter, "1.1"), connect(adapter, "1.2")
    assert adapter.subscribe(a, "public") == (True, False, None)
    assert adapter.subscribe(a, "presence-r", ("u1", {"n": 1})) == (True, True, {"u1": {"n": 1}})
    assert adapter.subscribe(b, "presence-r", ("u2", None)) == \
        (False, True, {"u1": {"n": 1}, "u2": None})
    assert adapter.unsubscribe(b, "presence-r") == ("presence-r", False, "u2")
    assert adapter.unsubscribe(b, "presence-r") is None


def test_presence_limit_refuses_new_users_but_not_known_ones(adapter):
    conns = [connect(adapter, f"1.{n}") for n in range(5)]
    for n in range(3):
        adapter.subscribe(conns[n], "presence-small", (f"u{n}", {}), limit=3)
    with pytest.raises(PresenceFull):
        adapter.subscribe(conns[3], "presence-small", ("u3", {}), limit=3)
    assert "presence-small" not in conns[3].subscriptions  # refused: nothing recorded
    occupied, added, roster = adapter.subscribe(conns[4], "presence-small", ("u0", {}), limit=3)
    assert (occupied, added, sorted(roster)) == (False, False, ["u0", "u1", "u2"])
    assert adapter.member_count(APP.id, "presence-small") == 3
    assert adapter.subscription_count(APP.id, "presence-small") == 4


def test_counts_and_members(adapter):
    a, b = connect(adapter, "1.1"), connect(adapter, "1.2")
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


def test_publish_delivers_here_and_skips_the_sender(adapter):
    a, b = connect(adapter, "1.1"), connect(adapter, "1.2")
    for conn in (a, b):
        adapter.subscribe(conn, "room")
    assert adapter.publish(APP.id, "room", b"frame", except_socket_id="1.1") == 1
    assert (a.ws.frames, b.ws.frames) == ([], [b"frame"])


def test_remove_connection_reports_vacated_channels_and_the_user_offline(adapter):
    conn = connect(adapter, "1.1")
    adapter.subscribe(conn, "presence-r", ("u1", {}))
    conn.user_id = "u1"
    assert adapter.sign_in(conn, "u1") is True
    assert adapter.user_online(APP.id, "u1")
    assert adapter.remove_connection(conn) == ([("presence-r", True, "u1")], "u1")
    assert not adapter.user_online(APP.id, "u1") and adapter.connection_count(APP.id) == 0


def test_watchers_get_the_frame_and_terminate_closes_every_connection_of_the_user(adapter):
    watcher, tab1, tab2, bystander = (connect(adapter, f"1.{n}") for n in range(1, 5))
    adapter.watch(watcher, ["u1"])
    adapter.tell_watchers(APP.id, "u1", b"online")
    assert watcher.ws.frames == [b"online"] and tab1.ws.frames == []
    for tab in (tab1, tab2):
        tab.user_id = "u1"
        adapter.sign_in(tab, "u1")
    adapter.terminate_user(APP.id, "u1")
    for tab in (tab1, tab2):
        assert tab.ws.closed[0] == 4009
        error = json.loads(tab.ws.frames[-1][2:])  # a small text frame: 2 header bytes
        assert error["event"] == "pusher:error" and error["data"]["code"] == 4009
    assert bystander.ws.closed is None and watcher.ws.closed is None


def test_cache_channels_and_misses(adapter):
    assert adapter.cache_get(APP.id, "cache-a") is None
    adapter.subscribe(connect(adapter, "1.1"), "cache-a")
    assert adapter.first_cache_miss(APP.id, "cache-a") is True
    assert adapter.first_cache_miss(APP.id, "cache-a") is False
    adapter.cache_set(APP.id, "cache-a", "e", "d", 60)
    assert adapter.cache_get(APP.id, "cache-a")[:2] == ("e", "d")
