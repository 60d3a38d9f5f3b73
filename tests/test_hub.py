"""The hub in-process: what each state change reports, who gets a broadcast and in what order,
sign-ins, watchlists and cache channels. Real Hub and Connection objects, each connection
writing a real socket whose other end the test reads as its client (conftest.SocketClient)."""
import gevent
import pytest

from bunpulse.apps import App
from bunpulse.frames import build_frame
from bunpulse.hub import YIELD_EVERY, Hub

APP = App(id="1", key="k1", secret="s1")
OTHER_APP = App(id="2", key="k2", secret="s2")


@pytest.fixture
def hub():
    return Hub()


@pytest.fixture
def joined(hub, socket_client):
    """joined(socket_id, *channels) -> the connection, added to the hub and subscribed; its
    client (the socket's other end) is `joined.clients[connection]`."""
    def join(socket_id, *channels, app=APP, member=None):
        client = socket_client(app, socket_id)
        hub.add_connection(client.conn)
        for name in channels:
            hub.subscribe(client.conn, name, member)
        clients[client.conn] = client
        return client.conn

    clients = join.clients = {}
    return join


# ---------------------------------------------------------------- channels

def test_first_subscriber_occupies_and_last_vacates(hub, joined):
    a, b = joined("1.1"), joined("1.2")
    assert hub.subscribe(a, "room") == (True, False)
    assert hub.subscribe(b, "room") == (False, False)
    assert hub.unsubscribe(a, "room") == ("room", False, None)
    assert hub.unsubscribe(b, "room") == ("room", True, None)
    assert hub.channel(APP.id, "room") is None and hub.channels(APP.id) == {}


def test_unsubscribing_what_was_never_subscribed_reports_nothing(hub, joined):
    a = joined("1.1", "room")
    assert hub.unsubscribe(a, "elsewhere") is None
    assert hub.unsubscribe(a, "room") == ("room", True, None)
    assert hub.unsubscribe(a, "room") is None  # twice: nothing the second time
    assert a.subscriptions == {}


def test_presence_member_added_once_and_removed_with_its_last_connection(hub, joined):
    tab1, tab2 = joined("1.1"), joined("1.2")
    assert hub.subscribe(tab1, "presence-r", ("u1", {"n": 1})) == (True, True)
    assert hub.subscribe(tab2, "presence-r", ("u1", {"n": 1})) == (False, False)
    assert hub.has_member(APP.id, "presence-r", "u1")
    assert hub.unsubscribe(tab1, "presence-r") == ("presence-r", False, None)
    assert hub.has_member(APP.id, "presence-r", "u1")
    assert hub.unsubscribe(tab2, "presence-r") == ("presence-r", True, "u1")
    assert not hub.has_member(APP.id, "presence-r", "u1")


def test_apps_do_not_share_channels_or_connections(hub, joined):
    joined("1.1", "room")
    joined("1.1", "room", app=OTHER_APP)  # same socket id and channel, other app
    assert hub.connection_count(APP.id) == hub.connection_count(OTHER_APP.id) == 1
    assert hub.broadcast(APP.id, "room", b"frame") == 1
    assert hub.connection_count("3") == 0 and hub.channels("3") == {}


def test_removing_a_connection_reports_every_channel_and_the_user_offline(hub, joined):
    conn = joined("1.1", "a", "b")
    hub.subscribe(conn, "presence-c", ("u1", {}))
    other = joined("1.2", "b")
    conn.user_id = "u1"
    assert hub.sign_in(conn, "u1") is True
    changes, offline = hub.remove_connection(conn)
    assert sorted(changes) == [("a", True, None), ("b", False, None),
                               ("presence-c", True, "u1")]
    assert offline == "u1" and not hub.user_online(APP.id, "u1")
    assert hub.connections(APP.id) == [other]
    assert list(hub.channels(APP.id)) == ["b"]


# ---------------------------------------------------------------- delivery

def test_broadcast_sends_the_frame_once_to_each_subscriber_but_the_excluded(hub, joined):
    a, b, c = (joined(f"1.{n}", "room") for n in (1, 2, 3))
    outsider = joined("1.9", "other")
    one, two = build_frame(b'{"n":1}'), build_frame(b'{"n":2}')
    assert hub.broadcast(APP.id, "room", one, except_socket_id="1.1") == 2
    assert hub.broadcast(APP.id, "room", two) == 3
    client = joined.clients
    assert client[a].messages() == [b'{"n":2}']
    assert client[b].messages() == client[c].messages() == [b'{"n":1}', b'{"n":2}']
    assert client[outsider].read().writes == []
    assert hub.broadcast(APP.id, "empty", one) == 0


def test_a_big_channel_yields_and_keeps_every_subscribers_order(hub, joined):
    """Past YIELD_EVERY subscribers a fan-out yields; frames published meanwhile queue behind
    it, may go out joined (one write), and still reach each subscriber once, in order, without
    its own."""
    conns = [joined(f"1.{n}", "big") for n in range(YIELD_EVERY * 2 + 7)]
    frames = [build_frame(b"<%d>" % n) for n in range(6)]
    excluded = conns[YIELD_EVERY + 3]

    def publish(n):
        skip = excluded.socket_id if n == 4 else None
        hub.broadcast(APP.id, "big", frames[n], except_socket_id=skip)

    greenlets = [gevent.spawn(publish, n) for n in range(len(frames))]
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    clients = [joined.clients[conn] for conn in conns]
    for conn, client in zip(conns, clients):
        want = [b"<%d>" % n for n in range(len(frames)) if not (conn is excluded and n == 4)]
        assert client.messages() == want, conn.socket_id
    assert any(len(client.writes) < len(frames) - 1 for client in clients)  # some went joined
    channel = hub.channel(APP.id, "big")
    assert not channel.queue and not channel.sending


# ---------------------------------------------------------------- users

def test_a_user_is_online_from_the_first_connection_to_the_last(hub, joined):
    tab1, tab2 = joined("1.1"), joined("1.2")
    for conn in (tab1, tab2):
        conn.user_id = "u1"
    assert hub.sign_in(tab1, "u1") is True
    assert hub.sign_in(tab2, "u1") is False
    assert set(hub.user_connections(APP.id, "u1")) == {tab1, tab2}
    assert hub.sign_out(tab1) is None and hub.user_online(APP.id, "u1")
    assert hub.sign_out(tab2) == "u1" and not hub.user_online(APP.id, "u1")
    assert hub.sign_out(tab2) is None  # already out
    assert hub.user_connections(APP.id, "u1") == []


def test_watchers_are_forgotten_when_they_sign_out(hub, joined):
    watcher, other = joined("1.1"), joined("1.2")
    watcher.watchlist = ("u1", "u2")
    hub.watch(watcher, watcher.watchlist)
    hub.watch(other, ["u1"])
    assert set(hub.watchers(APP.id, "u1")) == {watcher, other}
    assert hub.sign_out(watcher) is None  # never signed in: nobody goes offline
    assert hub.watchers(APP.id, "u1") == [other]
    assert hub.watchers(APP.id, "u2") == []


# ---------------------------------------------------------------- cache channels

def test_cache_keeps_the_last_event_until_it_expires(hub):
    assert hub.cache_get(APP.id, "cache-a") is None
    hub.cache_set(APP.id, "cache-a", "e1", "d1", ttl=60)
    hub.cache_set(APP.id, "cache-a", "e2", "d2", ttl=60)
    event, data, left = hub.cache_get(APP.id, "cache-a")
    assert (event, data) == ("e2", "d2") and 59 < left <= 60
    assert hub.cache_get(OTHER_APP.id, "cache-a") is None
    hub.cache_set(APP.id, "cache-b", "e", "d", ttl=0)  # expired at once
    assert hub.cache_get(APP.id, "cache-b") is None


def test_expired_entries_are_swept_by_later_writes(hub):
    for n in range(4):
        hub.cache_set(APP.id, f"cache-old-{n}", "e", "d", ttl=0)
    for n in range(10):
        hub.cache_set(APP.id, "cache-live", "e", n, ttl=60)
    assert set(hub.app(APP.id).cache) == {"cache-live"}


def test_a_cache_miss_is_reported_once_until_an_event_fills_the_channel(hub, joined):
    a = joined("1.1", "cache-a")
    assert hub.first_cache_miss(APP.id, "cache-a") is True
    assert hub.first_cache_miss(APP.id, "cache-a") is False
    hub.cache_set(APP.id, "cache-a", "e", "d", ttl=0)
    assert hub.first_cache_miss(APP.id, "cache-a") is True
    assert hub.first_cache_miss(APP.id, "cache-a") is False
    hub.unsubscribe(a, "cache-a")  # vacated: the reported miss goes with the channel
    joined("1.2", "cache-a")
    assert hub.first_cache_miss(APP.id, "cache-a") is True


def test_a_miss_on_a_channel_left_meanwhile_is_reported_and_not_kept(hub):
    """Its last subscriber left while the miss was served (Redis down, a wait): nothing may
    stay for a channel nobody is in, or made-up names would pile up."""
    for _ in range(2):
        assert hub.first_cache_miss(APP.id, "cache-gone") is True
    assert hub.channels(APP.id) == {}
