"""Cache channels (protocol reference, section 5): the last HTTP event is replayed to each new
subscriber right after subscription_succeeded, or pusher:cache_miss when there is none."""
import json
import os
import tracemalloc

import pytest
from pusher.errors import PusherBadRequest

from bunpulse import start_bunpulse
from conftest import (APP_ID, KEY, MASTER_KEY, SECRET, RawClient, bunpulse_bytes, churn,
                      connected, pusher_api, raw_subscribe, wait_until)

KINDS = ["cache-", "private-cache-", "presence-cache-", "private-encrypted-cache-"]


def channel_data(name, user_id="u1"):
    return json.dumps({"user_id": user_id}) if name.startswith("presence-") else None


def raw_join(raw, name, user_id="u1", target=None):
    """A raw subscriber; returns (client, the frame that follows subscription_succeeded)."""
    client = raw(target=target) if target else raw()
    raw_subscribe(client, connected(client), name, channel_data(name, user_id))
    succeeded = client.recv()
    assert succeeded["event"] == "pusher_internal:subscription_succeeded", succeeded
    return client, client.recv()


@pytest.fixture
def crypto_api(server):
    return pusher_api(server, encryption_master_key_base64=MASTER_KEY)


@pytest.mark.parametrize("prefix", KINDS)
def test_last_event_is_replayed_after_subscription_succeeded(node, raw, crypto_api, prefix):
    name = prefix + "replay"
    crypto_api.trigger(name, "first", {"n": 1})
    crypto_api.trigger(name, "second", {"n": 2})
    _, replayed = raw_join(raw, name)
    assert replayed["event"] == "second" and replayed["channel"] == name
    if "encrypted" in name:
        assert set(json.loads(replayed["data"])) == {"nonce", "ciphertext"}
    else:
        assert replayed["data"] == '{"n": 2}'  # the PyPI library's serialization, kept as is
    node.connect("a", presence={"user_id": "js"})
    node.subscribe("a", name)
    assert node.wait_event("a", "second", name)["data"] == {"n": 2}  # decrypted by pusher-js
    assert node.events("a", "first") == []


@pytest.mark.parametrize("prefix", KINDS)
def test_empty_cache_gives_cache_miss(node, raw, prefix):
    name = prefix + "empty"
    _, after = raw_join(raw, name)
    assert after == {"event": "pusher:cache_miss", "channel": name}
    node.connect("a", presence={"user_id": "js"})
    node.subscribe("a", name)
    node.wait_event("a", "pusher:cache_miss", name)


def test_subscribers_get_live_events_and_late_ones_the_latest(raw, api):
    live, _ = raw_join(raw, "cache-live")
    api.trigger_batch([{"channel": "cache-live", "name": "b1", "data": "one"},
                       {"channel": "cache-live", "name": "b2", "data": "two"}])
    assert live.recv()["event"] == "b1" and live.recv()["event"] == "b2"
    _, replayed = raw_join(raw, "cache-live")
    assert (replayed["event"], replayed["data"]) == ("b2", "two")
    api.trigger(["cache-multi-1", "cache-multi-2"], "many", "x")
    for name in ("cache-multi-1", "cache-multi-2"):
        assert raw_join(raw, name)[1]["event"] == "many"


def test_http_info_cache(api):
    assert api.channel_info("cache-info", ["cache"])["cache"] is None
    api.trigger("cache-info", "ev", {"a": 1})
    info = api.channel_info("cache-info", ["cache"])
    assert info["occupied"] is False
    cache = info["cache"]
    assert set(cache) == {"data", "ttl"} and cache["data"] == '{"a": 1}'
    assert 0 < cache["ttl"] <= 1800
    with pytest.raises(PusherBadRequest, match="cache"):  # not a cache channel
        api.channel_info("public-info", ["cache"])


def test_cache_miss_webhook_is_sent_once(start_server, raw, webhook_receiver):
    server = start_server(env={"BUNPULSE_WEBHOOK_URL": webhook_receiver.url,
                               "BUNPULSE_WEBHOOK_DELAY_MS": "0",
                               "BUNPULSE_WEBHOOK_BATCH_MS": "0"})
    for _ in range(3):
        _, after = raw_join(raw, "cache-hook", target=server)
        assert after["event"] == "pusher:cache_miss"
    # A later miss on another channel: every earlier webhook event was delivered before it.
    raw_join(raw, "cache-hook-end", target=server)
    webhook_receiver.wait_events("cache_miss", 2)
    assert webhook_receiver.events("cache_miss") == [{"name": "cache_miss", "channel": "cache-hook"},
                      {"name": "cache_miss", "channel": "cache-hook-end"}]


def test_cache_ttl_expires(start_server, raw, webhook_receiver):
    server = start_server(env={"BUNPULSE_CACHE_TTL": "1",
                               "BUNPULSE_WEBHOOK_URL": webhook_receiver.url,
                               "BUNPULSE_WEBHOOK_DELAY_MS": "0",
                               "BUNPULSE_WEBHOOK_BATCH_MS": "0"})
    api = pusher_api(server)
    raw_join(raw, "cache-ttl", target=server)  # a miss: one webhook
    webhook_receiver.wait_events("cache_miss", 1)
    api.trigger("cache-ttl", "ev", "x")
    assert raw_join(raw, "cache-ttl", target=server)[1]["event"] == "ev"
    assert api.channel_info("cache-ttl", ["cache"])["cache"]["ttl"] <= 1
    wait_until(lambda: api.channel_info("cache-ttl", ["cache"])["cache"] is None, 3,
               message="the cached event to expire")
    _, after = raw_join(raw, "cache-ttl", target=server)
    assert after == {"event": "pusher:cache_miss", "channel": "cache-ttl"}
    # The cache was filled in between, so this miss is reported again.
    webhook_receiver.wait_events("cache_miss", 2)


def test_expired_cache_entries_are_swept_without_being_read():
    """Events of cache channels nobody subscribes to again expire from memory too."""
    import time as clock
    from bunpulse.hub import Hub
    hub = Hub()
    for n in range(50):
        hub.cache_set("1", f"cache-{n}", "e", "{}", ttl=0.01)
    clock.sleep(0.02)
    for n in range(60):  # later writes sweep what expired
        hub.cache_set("1", "cache-live", "e", "{}", ttl=60)
    assert list(hub.app("1").cache) == ["cache-live"]


CHURNED = 3000  # distinct cache channels one client joins and leaves, one after another
LONG_NAME = "cache-churn-{}-" + "x" * 120  # long names, as an attacker would choose


def test_cache_channels_a_client_made_up_leave_nothing_behind():
    """No authentication is needed to join a cache channel: what the server keeps for one
    (its reported miss) must go with its last subscriber, or names made up by one client
    pile up for good. The server runs in this process so that tracemalloc sees its memory."""
    server = start_bunpulse(port=0, host="127.0.0.1", app_id=APP_ID, app_key=KEY,
                            app_secret=SECRET, env_file=os.devnull, max_messages_per_second=0)
    try:
        client = RawClient(f"ws://127.0.0.1:{server.port}/app/{KEY}?protocol=7")
        connected(client)
        churn(client, [f"cache-warm-{n}" for n in range(300)])  # first-use allocations
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        churn(client, [LONG_NAME.format(n) for n in range(CHURNED)])
        left = bunpulse_bytes(tracemalloc.take_snapshot(), before)
        state = server.core.hub.app(APP_ID)
        assert not state.channels and not state.cache
        # Each name held would cost more than its 140 characters: 3000 of them, over 400 kB.
        assert left < 32 * 1024, left
        client.close()
    finally:
        tracemalloc.stop()
        server.stop()
