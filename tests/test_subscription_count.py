"""pusher_internal:subscription_count, as pusher-js sees it (`pusher:subscription_count`,
`channel.subscriptionCount`): per app, off by default, throttled per channel (at most one
message per INTERVAL, trailing edge), on one process and across two nodes on Redis."""
import json
import time

import pusher
import pytest

from bunpulse.subscription_counts import INTERVAL
from conftest import (KEY, RawClient, RedisServer, ServerProcess, connected,
                      pusher_api, raw_subscribe, until_pong, wait_until)

COUNT = "pusher:subscription_count"
APPS = [{"id": "2", "key": "key-off", "secret": "secret-off"},  # the field's default: off
        {"id": "3", "key": "key-file", "secret": "secret-file", "subscription_count": True}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The environment's app with BUNPULSE_SUBSCRIPTION_COUNT, and the apps file's two."""
    apps = tmp_path_factory.mktemp("apps") / "apps.json"
    apps.write_text(json.dumps(APPS))
    process = ServerProcess(env={"BUNPULSE_SUBSCRIPTION_COUNT": "true",
                                 "BUNPULSE_APPS_FILE": str(apps)})
    yield process
    process.stop()


def counts(driver, id_, channel):
    return [e["data"] for e in driver.events(id_, COUNT, channel)]


def wait_count(driver, id_, channel, n):
    """Until pusher-js raised pusher:subscription_count with n and keeps n."""
    driver.wait(lambda r: r.get("type") == "event" and r["id"] == id_ and r["event"] == COUNT
                and r["channel"] == channel and r["data"] == {"subscription_count": n},
                what=f"{channel} count {n} on {id_}")
    wait_until(lambda: driver.call("subscription_count", id=id_, channel=channel)["result"]
               == n, message=f"channel.subscriptionCount {n} on {id_}")


def test_pusher_js_follows_the_count(server, node):
    for id_ in "abc":
        node.connect(id_)
    node.subscribe("a", "room")
    wait_count(node, "a", "room", 1)
    node.subscribe("b", "private-room")  # every kind but presence
    wait_count(node, "b", "private-room", 1)
    node.subscribe("b", "room")
    wait_count(node, "a", "room", 2)
    wait_count(node, "b", "room", 2)  # the newcomer too
    node.subscribe("c", "room")
    for id_ in "abc":
        wait_count(node, id_, "room", 3)
    node.call("unsubscribe", id="c", channel="room")
    wait_count(node, "a", "room", 2)
    node.call("disconnect", id="b")  # a closed connection leaves every channel
    wait_count(node, "a", "room", 1)
    # the webhook's name and value, as the HTTP API reports it
    assert pusher_api(server).channel_info("room", ["subscription_count"])[
        "subscription_count"] == 1


def test_a_burst_of_changes_costs_one_message_per_interval(server, node):
    """30 clients join and leave as fast as they can: the watcher gets the first change at
    once, then at most one message per interval, and the last one is the final count."""
    node.connect("w")
    node.subscribe("w", "busy")
    wait_count(node, "w", "busy", 1)
    time.sleep(INTERVAL)  # the channel is quiet again
    clients = [RawClient(f"{server.ws_url}/app/{KEY}?protocol=7") for _ in range(30)]
    started = time.monotonic()
    for rounds in range(3):
        for client in clients:
            if rounds == 0:
                connected(client)
            client.send({"event": "pusher:subscribe", "data": {"channel": "busy"}})
            client.send({"event": "pusher:unsubscribe", "data": {"channel": "busy"}})
        for client in clients:
            until_pong(client)
    for client in clients[:7]:  # 7 stay
        client.send({"event": "pusher:subscribe", "data": {"channel": "busy"}})
        until_pong(client)
    churned = time.monotonic() - started
    wait_count(node, "w", "busy", 8)
    time.sleep(INTERVAL * 1.5)  # nothing more comes once it is quiet
    got = node.events("w", COUNT, "busy")[1:]
    assert got[-1]["data"] == {"subscription_count": 8}
    # 180 changes; the leading message, then one per interval at most
    assert len(got) <= churned / INTERVAL + 2, (churned, [e["data"] for e in got])
    gaps = [later["at"] - earlier["at"] for earlier, later in zip(got, got[1:])]
    assert all(gap > INTERVAL * 0.8 for gap in gaps), gaps
    for client in clients:
        client.close()


def test_presence_channels_and_apps_without_the_field_get_none(server, node, node_for):
    node.connect("p", presence={"user_id": "u1"})
    node.connect("q", presence={"user_id": "u2"})
    node.subscribe("p", "presence-room")
    node.subscribe("q", "presence-room")
    off = node_for(server, app_id="2", key="key-off", secret="secret-off")
    off.connect("x")
    off.connect("y")
    off.subscribe("x", "room")
    off.subscribe("y", "room")
    time.sleep(INTERVAL)  # a message would have come by now; a marker proves delivery works
    pusher_api(server).trigger("presence-room", "marker", {})
    node.wait_event("p", "marker")
    pusher.Pusher(app_id="2", key="key-off", secret="secret-off", host=server.host,
                  port=server.port, ssl=False).trigger("room", "marker", {})
    off.wait_event("x", "marker")
    assert counts(node, "p", "presence-room") == []
    assert counts(off, "x", "room") == counts(off, "y", "room") == []
    assert off.call("subscription_count", id="x", channel="room")["result"] is None


def test_the_apps_file_field(server, node_for):
    driver = node_for(server, app_id="3", key="key-file", secret="secret-file")
    driver.connect("f")
    driver.subscribe("f", "private-encrypted-room")  # pusher-js passes it on undecrypted
    wait_count(driver, "f", "private-encrypted-room", 1)


def test_the_frame_on_the_wire(server):
    client = RawClient(f"{server.ws_url}/app/{KEY}?protocol=7")
    raw_subscribe(client, connected(client), "wire")
    client.recv_event("pusher_internal:subscription_succeeded")
    assert client.recv_event("pusher_internal:subscription_count") == {
        "event": "pusher_internal:subscription_count", "channel": "wire",
        "data": json.dumps({"subscription_count": 1}, separators=(",", ":"))}
    client.close()


# ------------------------------------------------------------------------ two nodes on Redis

@pytest.fixture
def two_nodes(start_server):
    redis = RedisServer()
    env = {**redis.env, "BUNPULSE_SUBSCRIPTION_COUNT": "1"}
    yield start_server(env=env), start_server(env=env)
    redis.stop()


def test_the_deployment_wide_count_reaches_both_nodes(two_nodes, node_for):
    a, b = two_nodes
    on_a, on_b = node_for(a), node_for(b)
    on_a.connect("a1")
    on_a.connect("a2")
    on_b.connect("b1")
    on_a.subscribe("a1", "shared")
    wait_count(on_a, "a1", "shared", 1)
    on_b.subscribe("b1", "shared")  # b's change reaches a's subscriber through Redis
    wait_count(on_b, "b1", "shared", 2)
    wait_count(on_a, "a1", "shared", 2)
    on_a.subscribe("a2", "shared")  # and a's reaches b's
    for driver, id_ in ((on_a, "a1"), (on_a, "a2"), (on_b, "b1")):
        wait_count(driver, id_, "shared", 3)
    on_b.call("unsubscribe", id="b1", channel="shared")
    wait_count(on_a, "a1", "shared", 2)
    wait_count(on_a, "a2", "shared", 2)
    assert pusher_api(b).channel_info("shared", ["subscription_count"])[
        "subscription_count"] == 2


def test_churn_on_both_nodes_ends_on_the_final_count(two_nodes, node_for):
    """Both nodes change the count at once, in bursts: every subscriber, on either node,
    ends on the deployment's final count, within the throttle's bound."""
    a, b = two_nodes
    on_a, on_b = node_for(a), node_for(b)
    on_a.connect("a")
    on_b.connect("b")
    on_a.subscribe("a", "hot")
    on_b.subscribe("b", "hot")
    wait_count(on_a, "a", "hot", 2)
    wait_count(on_b, "b", "hot", 2)
    clients = {node: [RawClient(f"{node.ws_url}/app/{KEY}?protocol=7") for _ in range(20)]
               for node in (a, b)}
    for group in clients.values():
        for client in group:
            connected(client)
    for _ in range(3):
        for group in clients.values():
            for client in group:
                client.send({"event": "pusher:subscribe", "data": {"channel": "hot"}})
                client.send({"event": "pusher:unsubscribe", "data": {"channel": "hot"}})
    for n, group in enumerate(clients.values()):
        for client in group[:3 + n]:  # 3 stay on a, 4 on b
            client.send({"event": "pusher:subscribe", "data": {"channel": "hot"}})
        for client in group:
            until_pong(client)
    for driver, id_ in ((on_a, "a"), (on_b, "b")):
        wait_count(driver, id_, "hot", 9)
    time.sleep(INTERVAL * 2.5)  # whatever else comes is the same count
    for driver, id_ in ((on_a, "a"), (on_b, "b")):
        assert counts(driver, id_, "hot")[-1] == {"subscription_count": 9}
    for group in clients.values():
        for client in group:
            client.close()
