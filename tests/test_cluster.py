"""Several processes on one Redis, or on a Redis Cluster, behave as one server.

Two `python -m bunpulse` nodes on two ports, and gunicorn with two workers, share a real
redis-server (or a cluster of three masters and a replica, started once for the module);
pusher-js and the official libraries see one deployment. Every test runs on both."""
import itertools
import json
import signal
import socket
import sys
import time

import pytest

from conftest import (KEY, RedisClusterServer, RedisServer, connected, gunicorn_workers,
                      only_worker, pusher_api, wait_until)


@pytest.fixture(scope="module")
def redis_cluster():
    cluster = RedisClusterServer()
    yield cluster
    cluster.close()


@pytest.fixture(params=["redis", "cluster"])
def redis_server(request):
    """One redis-server per test, or the module's cluster, emptied for the test."""
    if request.param == "redis":
        server = RedisServer()
        yield server
        server.stop()
        return
    cluster = request.getfixturevalue("redis_cluster")
    cluster.start()  # whatever an earlier test stopped
    cluster.flush()
    yield cluster


def cluster_env(redis_server, receiver=None, **extra):
    env = {**redis_server.env, "BUNPULSE_WEBHOOK_BATCH_MS": "0",
           "BUNPULSE_WEBHOOK_DELAY_MS": "0"}
    if receiver is not None:
        env["BUNPULSE_WEBHOOK_URL"] = receiver.url
    env.update(extra)
    return env


MARKERS = itertools.count()


def after_marker(node, channel, *receivers):
    """Trigger a marker event on `channel` through `node` and wait until every (driver, id)
    has it. A node sends to a socket, and relays over Redis, in order: whatever it sent these
    clients before the marker has arrived by then, so what is missing now never comes."""
    seq = next(MARKERS)
    pusher_api(node).trigger(channel, "marker", {"seq": seq})
    for driver, id_ in receivers:
        driver.wait(lambda r: r.get("type") == "event" and r["id"] == id_
                    and r["event"] == "marker" and r["data"] == {"seq": seq},
                    what=f"marker {seq} on {id_}")


def after_webhook_marker(receiver, driver, id_):
    """Subscribe `id_` to a fresh channel and wait for its channel_occupied webhook. A node
    sends its webhooks one batch at a time, in order: whatever that node sent before has
    arrived by then."""
    channel = f"marker-{next(MARKERS)}"
    driver.call("subscribe", id=id_, channel=channel)
    wait_until(lambda: any(e["channel"] == channel for e in receiver.events("channel_occupied")),
               message=f"channel_occupied for {channel}")


def relayed(redis_server, node, channel):
    """Wait until what `node` relayed on `channel` so far is in Redis: a marker event published
    through the node after it reaches a subscriber of the channel's Redis key (a node relays a
    channel's events in order, on one link to its master)."""
    from bunpulse.adapters.redis.scripts import Keys
    key = Keys().events("1", channel).encode()
    port, command = ((redis_server.master_of(key.decode()), b"SSUBSCRIBE")
                     if redis_server.cluster else (redis_server.port, b"SUBSCRIBE"))
    marker = f"relayed-{next(MARKERS)}-end"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as tap:
        tap.sendall(b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(command), command,
                                                                len(key), key))
        seen = b""
        while b"subscribe" not in seen:  # confirmed before the marker is published
            seen += tap.recv(65536)
        pusher_api(node).trigger(channel, marker, {})
        while marker.encode() not in seen:
            chunk = tap.recv(65536)
            assert chunk, "Redis closed the tap"
            seen += chunk


def named(events, channel):
    return [e for e in events if e["channel"] == channel]


@pytest.fixture
def nodes(start_server, redis_server, webhook_receiver):
    env = cluster_env(redis_server, webhook_receiver)
    return start_server(env=env), start_server(env=env)


def test_publish_on_one_node_reaches_subscribers_of_both_once(nodes, node_for):
    a, b = nodes
    client_a, client_b = node_for(a), node_for(b)
    client_a.connect("a")
    client_b.connect("b")
    client_a.subscribe("a", "news")
    client_b.subscribe("b", "news")
    pusher_api(a).trigger("news", "headline", {"n": 1})
    pusher_api(b).trigger("news", "headline", {"n": 2})
    for client, id_ in ((client_a, "a"), (client_b, "b")):
        wait_until(lambda: len(client.events(id_, "headline")) == 2, message="two headlines")
    for node in (a, b):  # a duplicate, from either node, would have come before its marker
        after_marker(node, "news", (client_a, "a"), (client_b, "b"))
    # Each once; no order between two publishers on two nodes (b's own event may beat a's relay).
    assert sorted(e["data"]["n"] for e in client_a.events("a", "headline")) == [1, 2]
    assert sorted(e["data"]["n"] for e in client_b.events("b", "headline")) == [1, 2]


def test_a_node_listens_only_to_channels_it_has_subscribers_for(nodes, node_for,
                                                               redis_server):
    from bunpulse.adapters.redis.scripts import Keys
    a, b = nodes
    client_a, client_b = node_for(a), node_for(b)
    client_a.connect("a")
    client_b.connect("b")
    events = Keys().events("1", "interest")
    client_a.subscribe("a", "interest")
    assert redis_server.listeners(events) == 1  # node a only: b has nobody there
    client_b.subscribe("b", "interest")
    assert redis_server.listeners(events) == 2
    pusher_api(a).trigger("interest", "hi", {})
    client_b.wait_event("b", "hi")
    client_b.call("unsubscribe", id="b", channel="interest")
    wait_until(lambda: redis_server.listeners(events) == 1, message="node b unsubscribed")
    client_a.call("disconnect", id="a")
    wait_until(lambda: redis_server.listeners(events) == 0, message="node a unsubscribed")


def test_socket_id_exclusion_and_client_events_cross_nodes(nodes, node_for):
    a, b = nodes
    client_a, client_b = node_for(a), node_for(b)
    socket_a = client_a.connect("a")
    client_b.connect("b")
    client_a.subscribe("a", "private-room")
    client_b.subscribe("b", "private-room")
    pusher_api(b).trigger("private-room", "skip-a", {}, socket_id=socket_a)
    client_b.wait_event("b", "skip-a")
    client_a.call("trigger", id="a", channel="private-room", event="client-hi", data={"x": 1})
    assert client_b.wait_event("b", "client-hi")["data"] == {"x": 1}
    for node in (a, b):
        after_marker(node, "private-room", (client_a, "a"), (client_b, "b"))
    assert client_a.events("a", "skip-a") == []
    assert client_a.events("a", "client-hi") == []


def test_a_burst_crosses_nodes_in_order_with_its_exclusions(nodes, raw):
    """Events that reach a node together go out joined per channel: none lost, reordered or
    sent to the socket it excludes."""
    a, b = nodes
    clients = [raw(target=b), raw(target=b)]
    socket_ids = [connected(client) for client in clients]
    for client in clients:
        client.send({"event": "pusher:subscribe", "data": {"channel": "burst"}})
        client.recv_event("pusher_internal:subscription_succeeded")
    api = pusher_api(a)
    for start in range(0, 60, 10):
        api.trigger_batch([{"channel": "burst", "name": "n", "data": json.dumps({"n": n}),
                            **({"socket_id": socket_ids[0]} if n % 3 == 0 else {})}
                           for n in range(start, start + 10)])
    api.trigger("burst", "end", {})

    def received(client):
        seen = []
        while True:
            message = client.recv()
            if message.get("event") == "end":
                return seen
            if message.get("event") == "n":
                seen.append(json.loads(message["data"])["n"])

    assert received(clients[0]) == [n for n in range(60) if n % 3]
    assert received(clients[1]) == list(range(60))


def test_presence_is_deployment_wide(nodes, node_for, webhook_receiver, redis_server):
    a, b = nodes
    client_a, client_b = node_for(a), node_for(b)
    client_a.connect("u1", presence={"user_id": "1", "user_info": {"name": "one"}})
    client_b.connect("u2", presence={"user_id": "2", "user_info": {"name": "two"}})
    client_b.connect("u1-tab2", presence={"user_id": "1", "user_info": {"name": "one"}})
    client_a.subscribe("u1", "presence-room")
    # Node a relays member_added(1) over Redis right after u1's subscription: it must be in
    # Redis before node b listens to the channel (u2 joining there), or u2 could see it after
    # a roster that already has user 1.
    relayed(redis_server, a, "presence-room")
    joined = client_b.subscribe("u2", "presence-room")
    assert sorted(joined["data"]["ids"]) == ["1", "2"]
    assert joined["data"]["members"]["1"] == {"name": "one"}
    client_a.wait_event("u1", "pusher:member_added")
    client_b.subscribe("u1-tab2", "presence-room")  # user 1 again, on the other node
    for node in (a, b):
        after_marker(node, "presence-room", (client_a, "u1"), (client_b, "u2"))
    assert len(client_a.events("u1", "pusher:member_added")) == 1
    assert client_b.events("u2", "pusher:member_added") == []

    for node in (a, b):
        info = pusher_api(node).channel_info("presence-room", ["user_count",
                                                                "subscription_count"])
        assert info["user_count"] == 2 and info["subscription_count"] == 3
        users = pusher_api(node).users_info("presence-room")["users"]
        assert sorted(u["id"] for u in users) == ["1", "2"]

    client_a.call("disconnect", id="u1")  # user 1 still has a tab on node b
    wait_until(lambda: pusher_api(a).channel_info("presence-room", ["subscription_count"])
               ["subscription_count"] == 2, message="node a saw u1 leave")
    for node in (a, b):
        after_marker(node, "presence-room", (client_b, "u2"))
    assert client_b.events("u2", "pusher:member_removed") == []
    client_b.call("disconnect", id="u1-tab2")
    removed = client_b.wait_event("u2", "pusher:member_removed")
    assert removed["data"]["id"] == "1"
    webhook_receiver.wait_events("member_removed", 1)
    client_a.connect("late")
    after_webhook_marker(webhook_receiver, client_a, "late")
    after_webhook_marker(webhook_receiver, client_b, "u2")
    # two nodes send their own webhooks: compare as sets of events, each exactly once
    assert sorted(e["user_id"] for e in webhook_receiver.events("member_added")) == ["1", "2"]
    assert [e["user_id"] for e in webhook_receiver.events("member_removed")] == ["1"]


def test_occupied_and_vacated_fire_once_for_the_deployment(nodes, node_for,
                                                           webhook_receiver):
    a, b = nodes
    client_a, client_b = node_for(a), node_for(b)
    client_a.connect("a")
    client_b.connect("b")
    client_a.subscribe("a", "shared")
    client_b.subscribe("b", "shared")
    webhook_receiver.wait_events("channel_occupied", 1)
    client_a.call("unsubscribe", id="a", channel="shared")
    after_webhook_marker(webhook_receiver, client_a, "a")
    assert webhook_receiver.events("channel_vacated") == []  # b still holds it
    channels = pusher_api(a).channels_info(prefix_filter="shared")["channels"]
    assert list(channels) == ["shared"]
    client_b.call("unsubscribe", id="b", channel="shared")
    webhook_receiver.wait_events("channel_vacated", 1)
    after_webhook_marker(webhook_receiver, client_a, "a")
    after_webhook_marker(webhook_receiver, client_b, "b")
    assert len(named(webhook_receiver.events("channel_occupied"), "shared")) == 1
    assert len(webhook_receiver.events("channel_vacated")) == 1
    assert pusher_api(b).channels_info(prefix_filter="shared")["channels"] == {}


def test_cache_miss_fires_once_per_occupation_of_the_deployment(nodes, node_for,
                                                                webhook_receiver):
    """The "miss reported" marker is shared by the nodes while the channel is occupied
    anywhere, and goes when it is vacated everywhere (names made up by clients must not
    pile up in Redis): a channel joined again after that is reported again."""
    a, b = nodes
    client_a, client_b = node_for(a), node_for(b)
    client_a.connect("a")
    client_b.connect("b")
    for driver, id_ in ((client_a, "a"), (client_b, "b")):
        driver.subscribe(id_, "cache-shared")
        driver.wait_event(id_, "pusher:cache_miss", "cache-shared")
    client_a.call("unsubscribe", id="a", channel="cache-shared")
    after_webhook_marker(webhook_receiver, client_a, "a")
    after_webhook_marker(webhook_receiver, client_b, "b")
    assert len(named(webhook_receiver.events("cache_miss"), "cache-shared")) == 1
    client_a.subscribe("a", "cache-shared")  # still occupied on b: no second webhook
    after_webhook_marker(webhook_receiver, client_a, "a")
    assert len(named(webhook_receiver.events("cache_miss"), "cache-shared")) == 1
    client_a.call("unsubscribe", id="a", channel="cache-shared")
    client_b.call("unsubscribe", id="b", channel="cache-shared")
    webhook_receiver.wait_events("channel_vacated", 1)
    client_b.subscribe("b", "cache-shared")
    wait_until(lambda: len(named(webhook_receiver.events("cache_miss"), "cache-shared")) == 2,
               message="the miss of the channel's second occupation")


def test_users_watchlists_terminate_and_cache_cross_nodes(nodes, node_for, redis_server):
    a, b = nodes
    client_a, client_b = node_for(a), node_for(b)
    client_a.connect("watcher", user={"id": "w", "watchlist": ["target"]})
    client_a.call("signin", id="watcher")
    client_a.wait(lambda r: r.get("type") == "watchlist" and r["name"] == "offline")
    client_b.connect("target", user={"id": "target"})
    client_b.call("signin", id="target")
    client_a.wait(lambda r: r.get("type") == "watchlist" and r["name"] == "online"
                  and r["user_ids"] == ["target"])
    # sendToUser through node a reaches the user signed in on node b, once node b listens to
    # the user's channel in Redis
    from bunpulse.adapters.redis.scripts import Keys
    wait_until(lambda: redis_server.listeners(Keys().events("1", "#server-to-user-target")) == 1,
               message="node b listening to the user's channel")
    reply = client_a.call("api", method="sendToUser", args=["target", "ping", {"k": 1}])
    assert reply["ok"], reply
    client_b.wait(lambda r: r.get("type") == "user_event" and r["event"] == "ping")
    # cache channels replay whichever node published
    pusher_api(a).trigger("cache-prices", "price", {"p": 3})
    client_b.call("subscribe", id="target", channel="cache-prices")
    assert client_b.wait_event("target", "price", "cache-prices")["data"] == {"p": 3}
    # terminate through node a closes the user's connection on node b
    pusher_api(a).terminate_user_connections("target")
    client_a.wait(lambda r: r.get("type") == "watchlist" and r["name"] == "offline"
                  and r["user_ids"] == ["target"], timeout=10)


def test_killed_node_is_reaped_once(start_server, redis_server, webhook_receiver, raw):
    env = cluster_env(redis_server, webhook_receiver)
    a, b = start_server(env=env), start_server(env=env)
    from bunpulse.signatures import channel_auth
    from bunpulse.apps import App
    app = App(id="1", key=KEY, secret="test-secret")
    survivor = raw(target=a)
    connected(survivor)
    survivor.send({"event": "pusher:subscribe", "data": {"channel": "survivor"}})
    survivor.recv_event("pusher_internal:subscription_succeeded")
    victim = raw(target=b)
    victim_id = connected(victim)
    data = json.dumps({"user_id": "dead", "user_info": {}})
    victim.send({"event": "pusher:subscribe", "data": {
        "channel": "presence-x", "channel_data": data,
        "auth": channel_auth(app, victim_id, "presence-x", data)}})
    victim.recv_event("pusher_internal:subscription_succeeded")
    victim.send({"event": "pusher:subscribe", "data": {"channel": "lonely"}})
    victim.recv_event("pusher_internal:subscription_succeeded")
    webhook_receiver.wait_events("channel_occupied", 1)
    b.signal(signal.SIGKILL)
    b.proc.wait(5)
    webhook_receiver.wait_events("channel_vacated", 2, timeout=25)  # maybe in two requests
    webhook_receiver.wait_events("member_removed", 1)
    time.sleep(0.5)  # and nothing more: each once
    vacated = [e["channel"] for e in webhook_receiver.events("channel_vacated")]
    assert sorted(vacated) == ["lonely", "presence-x"]
    assert [e["user_id"] for e in webhook_receiver.events("member_removed")] == ["dead"]
    assert list(pusher_api(a).channels_info()["channels"]) == ["survivor"]


def test_redis_restart_under_live_connections(start_server, redis_server, node_for):
    env = cluster_env(redis_server)
    a, b = start_server(env=env), start_server(env=env)
    client_a, client_b = node_for(a), node_for(b)
    client_a.connect("a")
    client_b.connect("b")
    client_a.subscribe("a", "live")
    client_b.subscribe("b", "live")
    redis_server.stop()
    # each node keeps serving its own sockets
    pusher_api(a).trigger("live", "local-only", {"n": 1})
    client_a.wait_event("a", "local-only")
    redis_server.start()

    def crosses():
        pusher_api(a).trigger("live", "again", {})
        time.sleep(0.2)
        return client_b.events("b", "again")
    wait_until(crosses, timeout=20, interval=0.3, message="cross-node delivery after restart")
    # the state was reconciled into the new Redis
    wait_until(lambda: pusher_api(b).channel_info("live", ["subscription_count"])
               .get("subscription_count") == 2, timeout=10, message="resynchronised counts")
    assert "lost Redis" in a.log()


def test_gunicorn_two_workers_on_redis(start_server, redis_server, node_for):
    env = cluster_env(redis_server, BUNPULSE_WORKERS="2")
    server = start_server(env=env, command=[sys.executable, "-m", "gunicorn", "-c",
                                            "gunicorn.conf.py"])
    clients = [node_for(server) for _ in range(2)]
    workers = gunicorn_workers(server)
    for n, client in enumerate(clients):
        for i in range(3):  # connections on both workers, reached on purpose
            with only_worker(server, workers[(n + i) % 2]):
                client.connect(f"c{n}{i}", presence={"user_id": f"u{n}{i}", "user_info": {}})
            client.subscribe(f"c{n}{i}", "presence-all")
    pusher_api(server).trigger("presence-all", "hello", {})
    for n, client in enumerate(clients):
        for i in range(3):
            client.wait_event(f"c{n}{i}", "hello")
    info = pusher_api(server).channel_info("presence-all", ["user_count"])
    assert info["user_count"] == 6
    after_marker(server, "presence-all", *[(client, f"c{n}{i}") for n, client in
                                            enumerate(clients) for i in range(3)])
    for n, client in enumerate(clients):
        for i in range(3):
            assert len(client.events(f"c{n}{i}", "hello")) == 1


def test_workers_above_one_without_redis_stops_start_up(start_server):
    with pytest.raises(RuntimeError, match="BUNPULSE_REDIS_URL"):
        start_server(env={"BUNPULSE_WORKERS": "2"},
                     command=[sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"])


def test_hundreds_of_concurrent_joins_keep_exact_counts(start_server, redis_server, raw):
    """More greenlets than Redis connections at once: each waits for a pooled connection
    instead of the node giving up on Redis (redis-py's default pool refuses the 101st)."""
    from bunpulse.apps import App
    from bunpulse.signatures import channel_auth
    server = start_server(env=cluster_env(redis_server))
    app = App(id="1", key=KEY, secret="test-secret")
    clients = []
    for i in range(240):
        client = raw(target=server)
        clients.append((client, connected(client), f"presence-many-{i % 24}", f"u{i}"))
    for client, socket_id, channel, user in clients:  # all at once, answers read later
        data = json.dumps({"user_id": user, "user_info": {}})
        client.send({"event": "pusher:subscribe", "data": {
            "channel": channel, "channel_data": data,
            "auth": channel_auth(app, socket_id, channel, data)}})
    for client, _, _, _ in clients:
        client.recv_event("pusher_internal:subscription_succeeded")
    api = pusher_api(server)
    for c in range(24):
        assert api.channel_info(f"presence-many-{c}", ["user_count"])["user_count"] == 10
    assert "lost Redis" not in server.log()


def test_presence_member_limit_holds_across_nodes(start_server, redis_server, raw, tmp_path):
    from bunpulse.apps import App
    from bunpulse.signatures import channel_auth
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps([{"id": "7", "key": "small-key", "secret": "small-secret",
                                 "max_presence_members": 3}]))
    env = cluster_env(redis_server, BUNPULSE_APPS_FILE=str(apps))
    a, b = start_server(env=env), start_server(env=env)
    app = App(id="7", key="small-key", secret="small-secret")

    def join(node, user):
        client = raw(f"/app/{app.key}?protocol=7", target=node)
        socket_id = connected(client)
        data = json.dumps({"user_id": user, "user_info": {}})
        client.send({"event": "pusher:subscribe", "data": {
            "channel": "presence-small", "channel_data": data,
            "auth": channel_auth(app, socket_id, "presence-small", data)}})
        while True:
            message = client.recv()
            if message.get("event") in ("pusher_internal:subscription_succeeded",
                                        "pusher:subscription_error"):
                return message

    assert join(a, "1")["event"] == "pusher_internal:subscription_succeeded"
    assert join(a, "2")["event"] == "pusher_internal:subscription_succeeded"
    third = join(b, "3")
    assert json.loads(third["data"])["presence"]["count"] == 3
    refused = join(b, "4")
    assert refused["event"] == "pusher:subscription_error"
    assert refused["data"]["status"] == 403
    assert join(a, "1")["event"] == "pusher_internal:subscription_succeeded"  # a known user


def test_two_deployments_with_their_own_key_prefix_share_nothing(start_server, redis_server,
                                                                  raw):
    """Deployment "bp" (two nodes, the default prefix) and "tenant-b" on one Redis (or
    cluster), the same app id, key and secret in both: no event, count or member crosses."""
    from conftest import raw_subscribe
    a1 = start_server(env=cluster_env(redis_server))
    a2 = start_server(env=cluster_env(redis_server))
    b = start_server(env=cluster_env(redis_server, BUNPULSE_REDIS_KEY_PREFIX="tenant-b"))
    clients = {}
    for name, node in (("a", a2), ("b", b)):
        client = clients[name] = raw(target=node)
        socket_id = connected(client)
        raw_subscribe(client, socket_id, "news")
        client.recv_event("pusher_internal:subscription_succeeded")
        raw_subscribe(client, socket_id, "presence-room", json.dumps({"user_id": f"u{name}"}))
        roster = client.recv_event("pusher_internal:subscription_succeeded")
        assert json.loads(roster["data"])["presence"]["ids"] == [f"u{name}"]
    pusher_api(a1).trigger(["news", "presence-room"], "from-a", {})  # a's other node
    pusher_api(b).trigger(["news", "presence-room"], "from-b", {})
    for name in ("a", "b"):  # nothing of the other (an event, a member_added) came first
        seen = [(m["event"], m["channel"]) for m in (clients[name].recv() for _ in range(2))]
        assert seen == [(f"from-{name}", "news"), (f"from-{name}", "presence-room")], seen
    for node, user in ((a1, "ua"), (b, "ub")):
        api = pusher_api(node)
        assert api.channel_info("news", ["subscription_count"])["subscription_count"] == 1
        assert api.channel_info("presence-room", ["user_count"])["user_count"] == 1
        assert api.users_info("presence-room")["users"] == [{"id": user}]
    if not redis_server.cluster:  # every key is one deployment's
        keys = redis_server.cli("--scan").split()
        assert keys and all(k.startswith(("bp:{", "tenant-b:{")) for k in keys), keys
        assert any(k.startswith("tenant-b:{") for k in keys)
        channels = redis_server.cli("pubsub", "channels").split()
        assert all(c.startswith(("bp:{", "tenant-b:{")) for c in channels), channels


# Last in the module: it leaves the cluster with a master and its replica swapped.
FAILOVER_WINDOW = 6.0  # seconds: the test cluster's node timeout (1 s), the replica's
#                        election, and a node's reconnection (at most 1 s apart)


def test_master_failover_loses_no_event_beyond_the_window(redis_cluster, start_server, raw):
    """A master dies while events flow through its slot: its replica takes over, and the
    events lost are those published within one window of the failure, none after."""
    import threading
    from bunpulse.adapters.redis.scripts import Keys
    cluster = redis_cluster
    cluster.start()
    cluster.flush()
    master = int(cluster.cli(cluster.ports[3], "info", "replication")
                 .split("master_port:")[1].split()[0])  # the master with a replica
    channel = next(f"failover-{n}" for n in range(1000)
                   if cluster.master_of(Keys().events("1", f"failover-{n}")) == master)
    env = cluster_env(cluster)
    a, b = start_server(env=env), start_server(env=env)
    subscriber = raw(target=b)
    connected(subscriber)
    subscriber.send({"event": "pusher:subscribe", "data": {"channel": channel}})
    subscriber.recv_event("pusher_internal:subscription_succeeded")

    received, sent, stop = [], [], threading.Event()

    def receive():
        while not stop.is_set() or len(received) < len(sent):
            try:
                message = subscriber.recv()
            except Exception:  # noqa: BLE001 - the socket's timeout: nothing more came
                return
            if isinstance(message, dict) and message.get("event") == "tick":
                received.append(json.loads(message["data"])["n"])

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    api = pusher_api(a)

    def publish(seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sent.append(time.monotonic())
            api.trigger(channel, "tick", {"n": len(sent) - 1})
            time.sleep(0.02)

    publish(1.0)
    killed_at = time.monotonic()
    cluster.kill(master)
    publish(FAILOVER_WINDOW + 2)
    stop.set()
    reader.join(10)

    assert received == sorted(set(received)), "events duplicated or out of order"
    before = [n for n in range(len(sent)) if sent[n] < killed_at]
    assert set(before) <= set(received), "an event published before the failure was lost"
    lost = sorted(set(range(len(sent))) - set(received))
    assert lost, "the failure cost nothing: was the master the channel's?"
    assert lost == list(range(lost[0], lost[-1] + 1)), f"lost events are not one run: {lost}"
    assert sent[lost[-1]] - killed_at < FAILOVER_WINDOW
    assert lost[-1] < len(sent) - 1 and received[-1] == len(sent) - 1
