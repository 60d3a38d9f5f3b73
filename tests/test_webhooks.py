"""Webhooks (protocol reference section 8) sent to a real receiver, validated by both official
server libraries: every event type, the format, per-target filtering, the delay and its
cancellation, batching, retries, bounded queues and the subscription vacancy URL."""
import hashlib
import hmac
import json
import signal
import threading
import time
import uuid

import pusher
import pytest
import requests

from conftest import (APP_ID, KEY, SECRET, RawClient, WebhookReceiver, connected, free_port,
                      pusher_api, wait_until)
from conftest import library_subscribe as subscribe

FAST = {"BUNPULSE_WEBHOOK_BATCH_MS": "20", "BUNPULSE_WEBHOOK_DELAY_MS": "0"}


def uid():
    return uuid.uuid4().hex[:8]


def hooked(start_server, url, **env):
    """A server whose environment app sends every webhook event to url."""
    return start_server(env={"BUNPULSE_WEBHOOK_URL": url, **FAST, **env})


@pytest.fixture
def clients():
    """Factory: clients(server, key=KEY) -> RawClient; closed after the test."""
    made = []

    def connect(server, key=KEY):
        client = RawClient(f"{server.ws_url}/app/{key}?protocol=7&client=py&version=1.0")
        made.append(client)
        return client

    yield connect
    for client in made:
        client.close()


@pytest.fixture
def second_receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def unsubscribe(client, channel):
    client.send({"event": "pusher:unsubscribe", "data": {"channel": channel}})


def join(clients, server, channel, user_id=None):
    """A new raw connection subscribed to channel (as user_id on presence channels)."""
    client = clients(server)
    socket_id = connected(client)
    member = {"user_id": user_id, "user_info": {"name": user_id}} if user_id else None
    subscribe(client, pusher_api(server), channel, member, socket_id)
    return client


def of(receiver, channel, name=None):
    return [e for e in receiver.events(name) if e.get("channel") == channel]


def names(receiver, channel):
    return [e["name"] for e in of(receiver, channel)]


def lower(headers):
    return {k.lower(): v for k, v in headers.items()}


# ------------------------------------------------------------------ each event type

def test_channel_occupied_and_vacated(start_server, webhook_receiver, clients):
    server = hooked(start_server, webhook_receiver.url)
    room = f"room-{uid()}"
    first = join(clients, server, room)
    second = join(clients, server, room)  # a second subscriber: no second occupied
    assert webhook_receiver.wait_events("channel_occupied") == [
        {"name": "channel_occupied", "channel": room}]
    unsubscribe(first, room)
    wait_until(lambda: len(of(webhook_receiver, room, "subscription_count")) == 3)
    assert not of(webhook_receiver, room, "channel_vacated")  # one subscriber is still there
    second.close()
    assert webhook_receiver.wait_events("channel_vacated") == [
        {"name": "channel_vacated", "channel": room}]
    assert names(webhook_receiver, room) == [
        "channel_occupied", "subscription_count", "subscription_count", "subscription_count",
        "channel_vacated"]


def test_member_added_and_removed(start_server, webhook_receiver, clients):
    server = hooked(start_server, webhook_receiver.url)
    room = f"presence-{uid()}"
    first = join(clients, server, room, "u1")
    second = join(clients, server, room, "u1")  # the same user again: no second member_added
    join(clients, server, room, "u2")
    wait_until(lambda: len(of(webhook_receiver, room, "member_added")) == 2)
    assert sorted(of(webhook_receiver, room, "member_added"), key=lambda e: e["user_id"]) == [
        {"name": "member_added", "channel": room, "user_id": "u1"},
        {"name": "member_added", "channel": room, "user_id": "u2"}]
    first.close()  # u1 still has a connection
    unsubscribe(second, room)
    assert webhook_receiver.wait_events("member_removed") == [
        {"name": "member_removed", "channel": room, "user_id": "u1"}]
    assert len(of(webhook_receiver, room, "member_added")) == 2
    assert not of(webhook_receiver, room, "channel_vacated")  # u2 is still there


def test_client_event(start_server, webhook_receiver, clients):
    server = hooked(start_server, webhook_receiver.url)
    api = pusher_api(server)
    private, presence = f"private-{uid()}", f"presence-{uid()}"
    client = clients(server)
    socket_id = connected(client)
    subscribe(client, api, private, socket_id=socket_id)
    subscribe(client, api, presence, {"user_id": "u9"}, socket_id)
    client.send({"event": "client-typing", "channel": private, "data": {"a": 1}})
    client.send({"event": "client-typing", "channel": presence, "data": {"b": 2}})
    events = webhook_receiver.wait_events("client_event", 2)
    assert events == [
        {"name": "client_event", "channel": private, "event": "client-typing",
         "data": '{"a":1}', "socket_id": socket_id},
        {"name": "client_event", "channel": presence, "event": "client-typing",
         "data": '{"b":2}', "socket_id": socket_id, "user_id": "u9"}]


def test_cache_miss(start_server, webhook_receiver, clients):
    server = hooked(start_server, webhook_receiver.url)
    cache = f"cache-{uid()}"
    join(clients, server, cache)
    join(clients, server, cache)  # one webhook until the cache is filled
    assert webhook_receiver.wait_events("cache_miss") == [{"name": "cache_miss",
                                                          "channel": cache}]
    # a later event of the same target comes after a second miss, had there been one
    join(clients, server, "marker")
    webhook_receiver.wait_events("channel_occupied", 2)
    assert len(of(webhook_receiver, cache, "cache_miss")) == 1
    pusher_api(server).trigger(cache, "fill", {})
    join(clients, server, cache)
    join(clients, server, "marker2")
    webhook_receiver.wait_events("channel_occupied", 3)
    assert len(of(webhook_receiver, cache, "cache_miss")) == 1


def test_cache_miss_once_per_occupation(start_server, webhook_receiver, clients):
    """What the server remembers of a reported miss goes with the channel's last subscriber
    (else names made up by clients would pile up): a channel vacated and joined again is an
    empty channel someone is in again, reported again, as channel_occupied is."""
    server = hooked(start_server, webhook_receiver.url)
    cache = f"cache-{uid()}"
    first, second = join(clients, server, cache), join(clients, server, cache)
    for client in (first, second):
        assert client.recv_event("pusher:cache_miss") == {"event": "pusher:cache_miss",
                                                          "channel": cache}
    first.close()
    second.close()
    webhook_receiver.wait_events("channel_vacated")
    assert len(of(webhook_receiver, cache, "cache_miss")) == 1
    join(clients, server, cache).recv_event("pusher:cache_miss")
    wait_until(lambda: len(of(webhook_receiver, cache, "cache_miss")) == 2,
               message="the second occupation's miss reported")
    assert [n for n in names(webhook_receiver, cache) if n != "subscription_count"] == [
        "channel_occupied", "cache_miss", "channel_vacated", "channel_occupied", "cache_miss"]


def test_subscription_count(start_server, webhook_receiver, clients):
    server = hooked(start_server, webhook_receiver.url)
    room, presence = f"room-{uid()}", f"presence-{uid()}"
    first = join(clients, server, room)
    join(clients, server, room)
    first.send({"event": "pusher:subscribe", "data": {"channel": room}})
    assert first.recv_event("pusher:error")["data"]["message"] == (
        f"Existing subscription to channel {room}")  # and the count is unchanged
    unsubscribe(first, room)
    # presence: every connection counts, also a second one of the same user
    join(clients, server, presence, "u1")
    again = join(clients, server, presence, "u1")
    unsubscribe(again, presence)
    wait_until(lambda: len(of(webhook_receiver, presence, "subscription_count")) >= 3)
    assert [e["subscription_count"] for e in of(webhook_receiver, room,
                                                "subscription_count")] == [1, 2, 1]
    assert [e["subscription_count"] for e in of(webhook_receiver, presence,
                                                "subscription_count")] == [1, 2, 1]
    assert of(webhook_receiver, room, "subscription_count")[0] == {
        "name": "subscription_count", "channel": room, "subscription_count": 1}


# ------------------------------------------------------------------ format and validation

def test_format_and_signature_validated_by_both_libraries(start_server, webhook_receiver,
                                                          clients, node_for):
    server = hooked(start_server, webhook_receiver.url)
    room = f"room-{uid()}"
    join(clients, server, room)
    webhook_receiver.wait_events("channel_occupied")
    request = next(r for r in webhook_receiver.requests if not r["failed"])
    headers, body = lower(request["headers"]), request["body"]
    assert headers["content-type"] == "application/json"
    assert headers["x-pusher-key"] == KEY
    assert headers["x-pusher-signature"] == hmac.new(SECRET.encode(), body,
                                                     hashlib.sha256).hexdigest()
    payload = json.loads(body)
    assert set(payload) == {"time_ms", "events"}
    assert abs(payload["time_ms"] - time.time() * 1000) < 10_000
    assert {"name": "channel_occupied", "channel": room} in payload["events"]

    validated = pusher_api(server).validate_webhook(headers["x-pusher-key"],
                                                    headers["x-pusher-signature"],
                                                    body.decode())
    assert validated == payload
    assert pusher_api(server).validate_webhook(KEY, headers["x-pusher-signature"],
                                               body.decode().replace(room, "other")) is None

    node = node_for(server)
    reply = node.call("webhook", headers=headers, rawBody=body.decode())
    assert reply["result"] == {"valid": True, "events": payload["events"]}
    tampered = node.call("webhook", headers=dict(headers, **{"x-pusher-signature": "0" * 64}),
                         rawBody=body.decode())
    assert tampered["result"]["valid"] is False


def test_event_types_per_target_from_apps_file(start_server, webhook_receiver, second_receiver,
                                               clients, tmp_path):
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps([{"id": "5", "key": "key5", "secret": "secret5", "webhooks": [
        {"url": webhook_receiver.url, "event_types": ["channel_occupied"]},
        {"url": second_receiver.url, "event_types": ["member_added", "member_removed"]}]}]))
    server = start_server(env={"BUNPULSE_APPS_FILE": str(apps), **FAST})
    api = pusher.Pusher(app_id="5", key="key5", secret="secret5", host=server.host,
                        port=server.port, ssl=False)
    room = f"presence-{uid()}"
    client = clients(server, key="key5")
    subscribe(client, api, room, {"user_id": "u1"}, connected(client))
    client.send({"event": "client-x", "channel": room, "data": {}})
    unsubscribe(client, room)
    second_receiver.wait_events("member_removed")
    subscribe(client, api, "after")  # the first target's queue is in order: a marker
    webhook_receiver.wait_events("channel_occupied", 2)
    assert webhook_receiver.events() == [{"name": "channel_occupied", "channel": room},
                                         {"name": "channel_occupied", "channel": "after"}]
    assert second_receiver.events() == [
        {"name": "member_added", "channel": room, "user_id": "u1"},
        {"name": "member_removed", "channel": room, "user_id": "u1"}]
    request = webhook_receiver.requests[0]
    assert lower(request["headers"])["x-pusher-key"] == "key5"
    assert api.validate_webhook("key5", lower(request["headers"])["x-pusher-signature"],
                                request["body"].decode())


def test_filter_and_headers_per_target_from_apps_file(start_server, webhook_receiver,
                                                     second_receiver, clients, tmp_path):
    # soketi's webhook filter (channel-name prefix, suffix, both) and custom headers
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps([{"id": "5", "key": "key5", "secret": "secret5", "webhooks": [
        {"url": webhook_receiver.url, "event_types": ["channel_occupied"],
         "filter": {"channel_name_starts_with": "presence-"},
         "headers": {"X-Token": "t0ken", "Authorization": "Bearer abc"}},
        {"url": second_receiver.url, "event_types": ["channel_occupied"],
         "filter": {"channel_name_starts_with": "private-", "channel_name_ends_with": "-audit"}},
        {"url": second_receiver.url, "event_types": ["channel_occupied"],
         "filter": {"channel_name_ends_with": "-log"}}]}]))
    server = start_server(env={"BUNPULSE_APPS_FILE": str(apps), **FAST})
    api = pusher.Pusher(app_id="5", key="key5", secret="secret5", host=server.host,
                        port=server.port, ssl=False)
    client = clients(server, key="key5")
    socket_id = connected(client)
    names = ["presence-room", "private-x-audit", "private-x", "room-audit", "room-log",
             "presence-marker-log"]
    for name in names:
        member = {"user_id": "u1"} if name.startswith("presence-") else None
        subscribe(client, api, name, member, socket_id)
    second_receiver.wait_events("channel_occupied", 3)
    webhook_receiver.wait_events("channel_occupied", 2)
    time.sleep(0.3)  # nothing else comes
    assert [e["channel"] for e in webhook_receiver.events()] == ["presence-room",
                                                                 "presence-marker-log"]
    # two targets share this URL, each with its own queue: no order between them
    assert sorted(e["channel"] for e in second_receiver.events()) == [
        "presence-marker-log", "private-x-audit", "room-log"]
    for request in webhook_receiver.requests:
        headers = lower(request["headers"])
        assert (headers["x-token"], headers["authorization"]) == ("t0ken", "Bearer abc")
        assert headers["x-pusher-key"] == "key5"
        assert api.validate_webhook("key5", headers["x-pusher-signature"],
                                    request["body"].decode())
    assert all("x-token" not in lower(r["headers"]) for r in second_receiver.requests)


# ------------------------------------------------------------------ delay and cancellation

def test_vacated_is_delayed_and_cancelled_by_a_quick_return(start_server, webhook_receiver,
                                                            clients):
    server = hooked(start_server, webhook_receiver.url, BUNPULSE_WEBHOOK_DELAY_MS="500")
    api = pusher_api(server)
    room = f"room-{uid()}"
    client = join(clients, server, room)
    webhook_receiver.wait_events("channel_occupied")
    unsubscribe(client, room)
    subscribe(client, api, room)  # back well within 500 ms
    left = time.monotonic()
    unsubscribe(client, room)
    vacated = webhook_receiver.wait_events("channel_vacated")
    delivered_at = next(r["at"] for r in webhook_receiver.requests if b"vacated" in r["body"])
    assert delivered_at - left >= 0.45  # delayed
    assert vacated == [{"name": "channel_vacated", "channel": room}]
    assert [n for n in names(webhook_receiver, room) if n != "subscription_count"] == [
        "channel_occupied", "channel_vacated"]


def test_member_removed_is_delayed_and_cancelled_by_a_quick_return(start_server,
                                                                   webhook_receiver, clients):
    server = hooked(start_server, webhook_receiver.url, BUNPULSE_WEBHOOK_DELAY_MS="500")
    api = pusher_api(server)
    room = f"presence-{uid()}"
    join(clients, server, room, "stays")
    flapper = clients(server)
    socket_id = connected(flapper)
    subscribe(flapper, api, room, {"user_id": "flaps"}, socket_id)
    webhook_receiver.wait_events("member_added", 2)
    unsubscribe(flapper, room)
    subscribe(flapper, api, room, {"user_id": "flaps"}, socket_id)  # back in time
    flapper.close()  # gone for good
    removed = webhook_receiver.wait_events("member_removed")
    assert removed == [{"name": "member_removed", "channel": room, "user_id": "flaps"}]
    assert [(e["name"], e["user_id"]) for e in of(webhook_receiver, room)
            if e["name"].startswith("member_")] == [
        ("member_added", "stays"), ("member_added", "flaps"), ("member_removed", "flaps")]
    assert names(webhook_receiver, room).count("channel_occupied") == 1
    assert "channel_vacated" not in names(webhook_receiver, room)


def test_vacated_after_the_delay_when_nobody_returns(start_server, webhook_receiver, clients):
    server = hooked(start_server, webhook_receiver.url, BUNPULSE_WEBHOOK_DELAY_MS="300")
    room = f"presence-{uid()}"
    client = join(clients, server, room, "u1")
    webhook_receiver.wait_events("member_added")
    client.close()
    webhook_receiver.wait_events("channel_vacated")
    assert [n for n in names(webhook_receiver, room) if n != "subscription_count"] == [
        "channel_occupied", "member_added", "member_removed", "channel_vacated"]


# ------------------------------------------------------------------ batching and retries

def test_events_are_batched(start_server, webhook_receiver, clients):
    server = hooked(start_server, webhook_receiver.url, BUNPULSE_WEBHOOK_BATCH_MS="500",
                    BUNPULSE_WEBHOOK_BATCH_SIZE="5")
    client = clients(server)
    connected(client)
    api = pusher_api(server)
    tag = uid()
    # fewer events than a batch: the first request waits for more, up to BATCH_MS
    started = time.monotonic()
    for n in range(2):  # each: channel_occupied and subscription_count
        subscribe(client, api, f"{tag}-{n}")
    wait_until(lambda: len(webhook_receiver.events()) == 4, message="4 events")
    assert len(webhook_receiver.requests) == 1
    assert webhook_receiver.requests[0]["at"] - started >= 0.45
    # a burst: full requests of BATCH_SIZE events, sent without waiting
    for n in range(2, 17):
        subscribe(client, api, f"{tag}-{n}")
    wait_until(lambda: len(webhook_receiver.events()) == 34, message="34 events")
    sizes = [len(json.loads(r["body"])["events"]) for r in webhook_receiver.requests]
    assert max(sizes) == 5 and len(sizes) <= 1 + 8, sizes
    assert [e["channel"] for e in webhook_receiver.events("channel_occupied")] == [
        f"{tag}-{n}" for n in range(17)]


def test_failed_deliveries_are_retried_once_each_in_order(start_server, webhook_receiver,
                                                         clients):
    server = hooked(start_server, webhook_receiver.url)
    webhook_receiver.fail_next = 2
    rooms = [f"room-{uid()}" for _ in range(3)]
    client = clients(server)
    connected(client)
    api = pusher_api(server)
    for room in rooms:
        subscribe(client, api, room)
        unsubscribe(client, room)
    wait_until(lambda: len(webhook_receiver.events("channel_vacated")) == 3, timeout=10,
               message="3 vacated after retries")
    assert [r["failed"] for r in webhook_receiver.requests][:2] == [True, True]
    for room in rooms:
        assert names(webhook_receiver, room) == ["channel_occupied", "subscription_count",
                                                 "channel_vacated"]
    # the failed requests held the same first events as the one that succeeded
    failed, first_ok = webhook_receiver.requests[0], webhook_receiver.requests[2]
    assert json.loads(failed["body"])["events"] == json.loads(first_ok["body"])["events"]
    # ... under one delivery id, so that a receiver can drop repeats; the next batch has its own
    ids = [lower(r["headers"])["x-bunpulse-webhook-id"] for r in webhook_receiver.requests]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 32
    assert len(set(ids[2:])) == len(ids) - 2


def test_a_receiver_that_times_out_is_retried(start_server, webhook_receiver, clients):
    server = hooked(start_server, webhook_receiver.url, BUNPULSE_WEBHOOK_TIMEOUT_MS="200")
    webhook_receiver.delay = 0.6  # longer than the timeout: the server gives up and retries
    room = f"room-{uid()}"
    client = join(clients, server, room)
    wait_until(lambda: webhook_receiver.requests, message="the slow request")
    webhook_receiver.delay = 0
    unsubscribe(client, room)
    webhook_receiver.wait_events("channel_vacated")
    holding = [r for r in webhook_receiver.requests if b"channel_occupied" in r["body"]]
    assert len(holding) >= 2  # the timed-out attempt and its retry
    assert names(webhook_receiver, room)[-1] == "channel_vacated"


def test_a_receiver_that_trickles_its_answer_is_given_up_and_retried(start_server,
                                                                     trickling_receiver,
                                                                     clients):
    """Issue 21, item 9, under gevent: an answer trickled a byte every 0.2 s is given up at
    BUNPULSE_WEBHOOK_TIMEOUT_MS (the whole request, not each read) and retried; what came
    meanwhile is delivered too."""
    server = hooked(start_server, trickling_receiver.url, BUNPULSE_WEBHOOK_TIMEOUT_MS="1000")
    first = f"room-{uid()}"
    join(clients, server, first)
    wait_until(lambda: trickling_receiver.requests, message="the first request")
    later = [f"room-{uid()}" for _ in range(3)]
    for channel in later:
        join(clients, server, channel)
    wait_until(lambda: {e["channel"] for e in trickling_receiver.events()} >= {first, *later},
               timeout=10, message="every channel_occupied delivered")
    first_try, retry = trickling_receiver.requests[:2]
    assert b"channel_occupied" in first_try["body"] and first in retry["body"].decode()
    assert 0.9 < retry["at"] - first_try["at"] < 3.0
    wait_until(lambda: "no whole answer within 1 s" in server.log(),
               message="the warning that says why")


def test_credentials_in_a_webhook_url_are_never_logged(start_server, webhook_receiver,
                                                       clients):
    """Issue 21, item 9: the URL's user and password, and a token in its query, stay out of
    every log line, at debug too (urllib3 logs each request's path and query there)."""
    url = webhook_receiver.url.replace("http://", "http://hookuser:s3cret-pass@") + \
        "?token=t0ken-value"
    server = hooked(start_server, url, BUNPULSE_LOG_LEVEL="debug")
    webhook_receiver.fail_next = 1  # one "answered 500" line naming the target
    room = f"room-{uid()}"
    join(clients, server, room)
    webhook_receiver.wait_events("channel_occupied")
    assert webhook_receiver.requests[0]["headers"]["Authorization"].startswith("Basic ")
    wait_until(lambda: "answered 500" in server.log(), message="the failure's line")
    log = server.log()
    assert "webhook to http://***@127.0.0.1:" in log and "/hook?***" in log
    for secret in ("hookuser", "s3cret-pass", "t0ken-value"):
        assert secret not in log, secret


def test_dead_receiver_keeps_memory_bounded_and_the_server_serving(start_server, clients,
                                                                   node_for, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps([{"id": "2", "key": "key2", "secret": "secret2",
                                 "max_client_events_per_second": 1_000_000,
                                 "webhooks": [{"url": dead, "event_types": ["client_event"]}]}]))
    server = start_server(env={"BUNPULSE_APPS_FILE": str(apps), **FAST,
                               "BUNPULSE_WEBHOOK_QUEUE_SIZE": "1000",
                               "BUNPULSE_MAX_MESSAGES_PER_SECOND": "0"},  # a flood on purpose
                          metrics=True)
    api = pusher.Pusher(app_id="2", key="key2", secret="secret2", host=server.host,
                        port=server.port, ssl=False)
    client = clients(server, key="key2")
    subscribe(client, api, "private-burst", socket_id=connected(client))
    frame = json.dumps({"event": "client-burst", "channel": "private-burst",
                        "data": {"blob": "x" * 4000}})

    def rss_kb():
        with open(f"/proc/{server.proc.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    def burst(count):
        for _ in range(count):
            client.send(frame)
        client.send({"event": "pusher:ping", "data": {}})
        client.recv_event("pusher:pong")  # every event of the burst has been handled

    burst(1000)  # fill the queue once
    before = rss_kb()
    sender = threading.Thread(target=burst, args=(10_000,))
    sender.start()
    node = node_for(server)  # pusher-js on the other app, served meanwhile
    node.connect("a")
    node.subscribe("a", "live")
    pusher_api(server).trigger("live", "still-here", {"ok": True})
    assert node.wait_event("a", "still-here", "live")["data"] == {"ok": True}
    sender.join(60)
    assert not sender.is_alive()
    grown = rss_kb() - before
    # 10,000 events of 4 KB held would be over 40 MB; the queue holds 1,000 at most
    assert grown < 20_000, f"RSS grew by {grown} kB"
    assert server.metric("bunpulse_webhooks_dropped_total", app_id="2",
                         reason="queue_full") >= 9_000
    assert server.metric("bunpulse_webhooks_sent_total") == 0
    assert server.metric("bunpulse_webhooks_failed_total", app_id="2") >= 1
    wait_until(lambda: "is full" in server.log(), message="a warning about the full queue")


def test_subscription_vacancy_url_gets_only_channel_vacated(start_server, webhook_receiver,
                                                           clients):
    server = start_server(env={"BUNPULSE_SUBSCRIPTION_VACANCY_URL": webhook_receiver.url,
                               **FAST})
    api = pusher_api(server)
    room, other = f"presence-{uid()}", f"cache-{uid()}"
    client = clients(server)
    socket_id = connected(client)
    subscribe(client, api, room, {"user_id": "u1"}, socket_id)
    subscribe(client, api, other)
    client.send({"event": "client-x", "channel": room, "data": {}})
    unsubscribe(client, room)
    unsubscribe(client, other)
    webhook_receiver.wait_events("channel_vacated", 2)
    assert webhook_receiver.events() == [{"name": "channel_vacated", "channel": room},
                                         {"name": "channel_vacated", "channel": other}]
    request = webhook_receiver.requests[0]
    assert api.validate_webhook(KEY, lower(request["headers"])["x-pusher-signature"],
                                request["body"].decode())


def test_a_stopping_server_reports_what_its_clients_vacated(start_server, webhook_receiver,
                                                           clients):
    # the default 3 s delay: a stopping server sends delayed events at once
    server = start_server(env={"BUNPULSE_WEBHOOK_URL": webhook_receiver.url})
    room = f"presence-{uid()}"
    client = join(clients, server, room, "u1")
    webhook_receiver.wait_events("member_added")
    stopping = time.monotonic()
    server.signal(signal.SIGTERM)
    assert client.recv_close()[0] == 4200  # answering the close lets the server see it leave
    server.proc.wait(10)
    assert time.monotonic() - stopping < 3
    assert [n for n in names(webhook_receiver, room) if n != "subscription_count"] == [
        "channel_occupied", "member_added", "member_removed", "channel_vacated"]


def test_metrics_count_sent_and_failed_webhooks(start_server, webhook_receiver, clients):
    server = start_server(env={"BUNPULSE_WEBHOOK_URL": webhook_receiver.url, **FAST},
                          metrics=True)
    webhook_receiver.fail_next = 1
    join(clients, server, f"room-{uid()}")
    webhook_receiver.wait_events("subscription_count")
    wait_until(lambda: server.metric("bunpulse_webhooks_sent_total", app_id=APP_ID) == 2)
    assert server.metric("bunpulse_webhooks_failed_total", app_id=APP_ID) == 1
    assert server.metric("bunpulse_webhooks_dropped_total") == 0
    stats = requests.get(server.metrics_url + "/stats", timeout=5).json()
    assert (stats["webhooks_sent_total"], stats["webhooks_failed_total"]) == (2, 1)
    # the public port shows none of it
    assert requests.get(server.url + "/stats", timeout=5).status_code == 404


def test_same_url_as_webhook_and_vacancy_target_gets_each_event_once(start_server,
                                                                      webhook_receiver, raw):
    from conftest import connected
    server = start_server(env={"BUNPULSE_WEBHOOK_URL": webhook_receiver.url,
                               "BUNPULSE_SUBSCRIPTION_VACANCY_URL": webhook_receiver.url,
                               "BUNPULSE_WEBHOOK_DELAY_MS": "0", "BUNPULSE_WEBHOOK_BATCH_MS": "0"})
    client = raw(target=server)
    connected(client)
    client.send({"event": "pusher:subscribe", "data": {"channel": "once"}})
    client.recv_event("pusher_internal:subscription_succeeded")
    client.send({"event": "pusher:unsubscribe", "data": {"channel": "once"}})
    client.send({"event": "pusher:subscribe", "data": {"channel": "marker"}})
    client.recv_event("pusher_internal:subscription_succeeded")
    webhook_receiver.wait_events("channel_occupied", 2)  # marker's comes after once's vacated
    assert len(webhook_receiver.events("channel_vacated")) == 1


# ------------------------------------------------------------------ giving up

def batch_of(request):
    return json.loads(request["body"])["events"]


def test_a_batch_whose_retries_run_out_is_dropped_and_the_next_one_sent(
        start_server, webhook_receiver, clients):
    """--webhook-retry-seconds (the flag) bounds how long a failing batch is retried: then it
    is dropped, counted and logged, and the batches behind it go on."""
    server = start_server(env={"BUNPULSE_WEBHOOK_URL": webhook_receiver.url, **FAST},
                          args=["--webhook-retry-seconds", "1"], metrics=True)
    webhook_receiver.fail_next = 1000  # failing until told otherwise
    lost, kept = f"lost-{uid()}", f"kept-{uid()}"
    join(clients, server, lost)
    wait_until(lambda: webhook_receiver.requests, message="the first attempt")
    first = webhook_receiver.requests[0]["at"]
    wait_until(lambda: server.metric("bunpulse_webhooks_dropped_total", app_id=APP_ID,
                                     reason="retries_exhausted"),
               timeout=10, interval=0.05, message="the batch dropped")
    given_up = time.monotonic()
    webhook_receiver.fail_next = 0
    attempts = list(webhook_receiver.requests)
    assert len(attempts) >= 2 and all(r["failed"] for r in attempts)  # retried, then dropped
    assert all(batch_of(r) == batch_of(attempts[0]) for r in attempts)
    # The server's second starts before its first request reaches the receiver: some slack.
    assert given_up - first >= 0.9, "dropped before --webhook-retry-seconds ran out"
    dropped = len(batch_of(attempts[0]))
    assert {e["channel"] for e in batch_of(attempts[0])} == {lost}
    assert server.metric("bunpulse_webhooks_dropped_total", reason="retries_exhausted") \
        == dropped
    assert server.metric("bunpulse_webhooks_failed_total", app_id=APP_ID) == len(attempts)
    assert f"failed for 1 s: dropped {dropped} events" in server.log()
    join(clients, server, kept)  # the next batch is sent; the dropped one never comes back
    webhook_receiver.wait_events("channel_occupied")
    assert [e["channel"] for e in webhook_receiver.events("channel_occupied")] == [kept]
    assert of(webhook_receiver, lost) == []


@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_is_a_failed_delivery_not_followed(start_server, webhook_receiver, clients,
                                                      status):
    """A redirect would turn the POST into a GET (302), or send the signed events to an
    address the app did not configure: a 3xx is a failure, retried at the webhook URL."""
    server = start_server(env={"BUNPULSE_WEBHOOK_URL": webhook_receiver.url, **FAST},
                          metrics=True)
    webhook_receiver.fail_next, webhook_receiver.fail_status = 1, status
    webhook_receiver.fail_location = webhook_receiver.url + "/elsewhere"
    room = f"room-{uid()}"
    join(clients, server, room)
    webhook_receiver.wait_events("channel_occupied")
    wait_until(lambda: server.metric("bunpulse_webhooks_sent_total", app_id=APP_ID),
               message="the retry counted")
    redirected, retried = webhook_receiver.requests[:2]
    assert redirected["failed"] and not retried["failed"]
    assert batch_of(redirected) == batch_of(retried)
    assert [(r["method"], r["path"]) for r in webhook_receiver.requests] == \
        [("POST", "/hook")] * len(webhook_receiver.requests)
    assert server.metric("bunpulse_webhooks_failed_total", app_id=APP_ID) == 1
    assert f"answered {status}" in server.log()
    assert [e["channel"] for e in webhook_receiver.events("channel_occupied")] == [room]
