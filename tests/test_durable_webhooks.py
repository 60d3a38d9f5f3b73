"""Durable webhooks (docs/webhooks.md#durable-webhooks-with-redis): with Redis, queued webhooks
survive a worker killed with SIGKILL and a restart of redis-server, every event is delivered
at least once, and a repeated request carries the id it had. Real gunicorn workers and nodes,
a real redis-server, a real HTTP receiver that is down at first."""
import json
import os
import signal
import sys
import time

from conftest import (RedisServer, connected, gunicorn_workers, only_worker, pusher_api,
                      start_redis, stop_redis, wait_until, RawClient)
from conftest import library_subscribe as subscribe

DOWN = 10 ** 6  # requests the receiver fails: down until told otherwise
ID = "x-bunpulse-webhook-id"
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]


def env_for(redis_server, receiver, **extra):
    return {**redis_server.env, "BUNPULSE_WEBHOOK_URL": receiver.url,
            "BUNPULSE_WEBHOOK_BATCH_MS": "20", "BUNPULSE_WEBHOOK_DELAY_MS": "0",
            "BUNPULSE_WEBHOOK_BATCH_SIZE": "5", "BUNPULSE_WEBHOOK_TIMEOUT_MS": "500", **extra}


def occupy(server, channels):
    """One raw client on `server` subscribed to every channel; it stays open."""
    client = RawClient(f"{server.ws_url}/app/test-key?protocol=7&client=py&version=1.0")
    socket_id = connected(client)
    for channel in channels:
        subscribe(client, pusher_api(server), channel, None, socket_id)
    return client


def requests_of(receiver):
    """[(delivery id, failed, [event, ...])] of every POST, in arrival order."""
    return [(next(v for k, v in r["headers"].items() if k.lower() == ID), r["failed"],
             json.loads(r["body"])["events"]) for r in list(receiver.requests)]


def occupied(receiver):
    return [e["channel"] for e in receiver.events("channel_occupied")]


def assert_repeats_keep_their_id(receiver):
    """Every request under one id carried the same events: a receiver may drop repeats."""
    by_id = {}
    for delivery_id, _, events in requests_of(receiver):
        assert by_id.setdefault(delivery_id, events) == events, delivery_id
    return by_id


def test_a_worker_killed_with_webhooks_pending_loses_none(start_server, redis_server,
                                                         webhook_receiver):
    webhook_receiver.fail_next = DOWN
    server = start_server(env=env_for(redis_server, webhook_receiver, BUNPULSE_WORKERS="2"),
                          command=GUNICORN)
    workers = gunicorn_workers(server)
    victim = workers[0]
    channels = [f"room-{n}" for n in range(12)]
    with only_worker(server, victim):  # its events are queued, and being sent, by the victim
        client = occupy(server, channels)
        wait_until(lambda: len(webhook_receiver.requests) >= 2, 10,
                   message="the victim trying to send")
    assert not occupied(webhook_receiver)
    queued = redis_server.cli("--scan", "--pattern", "bp:*:wh:q:*").split()
    assert len(queued) == 1, queued  # in Redis, not only in the victim's memory
    client.close()
    os.kill(victim, signal.SIGKILL)
    webhook_receiver.fail_next = 0  # the receiver is back; the survivors send
    wait_until(lambda: set(channels) <= set(occupied(webhook_receiver)), 20,
               message="every channel_occupied, from the surviving workers")
    by_id = assert_repeats_keep_their_id(webhook_receiver)
    failed_ids = {i for i, failed, _ in requests_of(webhook_receiver) if failed}
    delivered_ids = {i for i, failed, _ in requests_of(webhook_receiver) if not failed}
    assert failed_ids & delivered_ids  # the batch the victim failed, sent again under its id
    assert len(by_id) >= 3  # 12 events in batches of 5
    wait_until(lambda: redis_server.cli("--scan", "--pattern", "bp:*:wh:q:*").split() == [],
               10, message="the queue gone once delivered")


class PersistentRedis(RedisServer):
    """A redis-server that keeps its data across a restart (appendonly, every write)."""

    def __init__(self, directory):
        self.dir = directory
        super().__init__()

    def start(self):
        self.proc = start_redis(self.port, "--appendonly", "yes", "--appendfsync", "always",
                                "--dir", str(self.dir))


def test_webhooks_pending_across_a_redis_restart_are_delivered(start_server, webhook_receiver,
                                                               tmp_path):
    redis_server = PersistentRedis(tmp_path)
    try:
        webhook_receiver.fail_next = DOWN
        server = start_server(env=env_for(redis_server, webhook_receiver))
        before = [f"before-{n}" for n in range(6)]
        clients = [occupy(server, before)]
        wait_until(lambda: len(webhook_receiver.requests) >= 1, 10, message="a failed try")
        stop_redis(redis_server.proc)
        during = [f"during-{n}" for n in range(4)]  # held by the node until Redis is back
        clients.append(occupy(server, during))
        redis_server.start()
        webhook_receiver.fail_next = 0
        wait_until(lambda: set(before + during) <= set(occupied(webhook_receiver)), 20,
                   message="every channel_occupied after the restart")
        assert_repeats_keep_their_id(webhook_receiver)
        assert "Redis is back" in server.log()
        for client in clients:
            client.close()
    finally:
        redis_server.stop()


def test_a_quick_return_on_another_node_cancels_the_delayed_vacated(start_server, redis_server,
                                                                    webhook_receiver):
    # the delay lives in Redis: a channel vacated on one node and occupied again on another
    # within the delay reports neither
    env = env_for(redis_server, webhook_receiver, BUNPULSE_WEBHOOK_DELAY_MS="1500")
    first, second = start_server(env=env), start_server(env=env)
    client = occupy(first, ["room"])
    webhook_receiver.wait_events("channel_occupied")
    client.close()
    time.sleep(0.3)
    again = occupy(second, ["room"])
    time.sleep(2.5)  # past the delay
    occupy(second, ["marker"])
    webhook_receiver.wait_events("channel_occupied", 2)
    assert [(e["name"], e["channel"]) for e in webhook_receiver.events()
            if e["name"] in ("channel_occupied", "channel_vacated")] == [
        ("channel_occupied", "room"), ("channel_occupied", "marker")]
    again.close()
    wait_until(lambda: webhook_receiver.events("channel_vacated"), 10,
               message="the vacated, once nobody returns")
