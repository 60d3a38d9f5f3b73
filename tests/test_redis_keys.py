"""The Redis key layout: on a cluster, every script's keys must share one slot; and no key or
pub/sub subscription named after a client's channel outlives the channel's last subscriber."""
import inspect
import subprocess
import sys

import pytest
import redis
from redis.crc import key_slot

from bunpulse.adapters.redis.scripts import MISS_TTL, SCRIPTS, Keys
from conftest import KEY, ROOT, RawClient, churn, connected, wait_until


KEYS = Keys()  # the default prefix, "bp"


def slot(key):
    return key_slot(key.encode())


@pytest.mark.parametrize("prefix", ["bp", "tenant-b", "staging:eu"])
def test_a_channels_keys_and_events_share_one_slot(prefix):
    KEYS = Keys(prefix)  # noqa: N806 - the module's name, with another prefix
    for app_id, channel in (("1", "news"), ("app-id", "presence-room"),
                            ("7", "#server-to-user-42"), ("1", "private-encrypted-x;y=z")):
        keys = [KEYS.subscriptions(app_id, channel), KEYS.members(app_id, channel),
                KEYS.node_members(app_id, channel, "node1"), KEYS.member_infos(app_id, channel),
                KEYS.cache(app_id, channel), KEYS.cache_miss(app_id, channel),
                KEYS.events(app_id, channel)]
        assert len({slot(key) for key in keys}) == 1, keys
        assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("prefix", ["bp", "tenant-b"])
def test_an_apps_keys_share_one_slot_and_the_deployments_another(prefix):
    KEYS = Keys(prefix)  # noqa: N806 - the module's name, with another prefix
    keys = [KEYS.connections("1"), KEYS.users("1"), KEYS.node_users("1", "n"),
            KEYS.occupied("1", "n"), KEYS.occupied("1", "m")]
    assert len({slot(key) for key in keys}) == 1
    deployment = [KEYS.NODES, KEYS.CONTROL, KEYS.reap_lock("n")]
    assert len({slot(key) for key in deployment}) == 1


def test_channels_spread_over_slots():
    slots = {slot(KEYS.events("1", f"channel-{n}")) for n in range(1000)}
    assert len(slots) > 900  # a cluster shares the channels out between its masters


def test_every_key_kind_is_declared_once_in_keys():
    kinds = [name for name, _ in inspect.getmembers(KEYS)
             if not name.startswith("_") and name != "prefix"]
    suffixes = []
    for name in kinds:
        member = getattr(KEYS, name)
        key = member if isinstance(member, str) else member(
            *["a"] * len(inspect.signature(member).parameters))
        suffixes.append(key.split("}", 1)[1])
    assert len(set(suffixes)) == len(suffixes), suffixes


def test_the_prefix_begins_every_key_and_the_default_keeps_the_names():
    assert (KEYS.NODES, KEYS.CONTROL) == ("bp:{bp}:nodes", "bp:{bp}:control")
    assert KEYS.events("1", "news") == "bp:{1:news}:events"
    other = Keys("tenant-b")
    for name, member in inspect.getmembers(other):
        if not name.startswith("_") and name != "prefix":
            key = member if isinstance(member, str) else member(
                *["a"] * len(inspect.signature(member).parameters))
            assert key.startswith("tenant-b:{"), key


# ---------------------------------------------------------------- keys named by clients

CHURNED = 2000  # distinct cache channels one client joins and leaves, one after another


def keys(redis_server):
    return sorted(redis_server.cli("--scan").split())


def test_cache_channels_a_client_made_up_leave_no_keys_and_no_listening(start_server,
                                                                       redis_server):
    """No authentication is needed to join a cache channel: nothing a node writes to Redis for
    one (its counts, its "miss reported" marker, its pub/sub subscription) may outlive its
    last subscriber, or names made up by one client pile up in Redis."""
    server = start_server(env=dict(redis_server.env, BUNPULSE_MAX_MESSAGES_PER_SECOND="0"))
    client = RawClient(f"{server.ws_url}/app/{KEY}?protocol=7")
    try:
        connected(client)
        churn(client, ["cache-warm"])
        before = wait_until(lambda: (found := keys(redis_server)) and found, message="keys")
        listened = redis_server.cli("pubsub", "channels").split()
        churn(client, [f"cache-churn-{n}" for n in range(CHURNED)])
        wait_until(lambda: keys(redis_server) == before, 5,
                   message=f"the keys of {CHURNED} channels gone: {keys(redis_server)[:5]}")
        assert redis_server.cli("pubsub", "channels").split() == listened
    finally:
        client.close()


def test_a_miss_is_kept_only_while_its_channel_is_occupied(redis_server):
    """The scripts themselves: the marker is set once for an occupied channel, and goes when
    the channel is vacated (by a plain or a presence leave) or when a miss comes after."""
    client = redis.Redis.from_url(redis_server.url)

    def run(name, keys, args):
        return client.evalsha(SCRIPTS[name][1], len(keys), *keys, *args)

    for source, _ in SCRIPTS.values():
        client.script_load(source)
    subs, miss = KEYS.subscriptions("1", "cache-x"), KEYS.cache_miss("1", "cache-x")
    assert run("miss", [subs, miss], [MISS_TTL]) == 1  # nobody in it: reported, not kept
    assert client.exists(miss) == 0
    assert run("channel", [subs, miss], ["n1", 1]) == 1
    assert run("channel", [subs, miss], ["n2", 1]) == 2
    assert [run("miss", [subs, miss], [MISS_TTL]) for _ in range(3)] == [1, 0, 0]
    assert 0 < client.ttl(miss) <= MISS_TTL
    assert run("channel", [subs, miss], ["n1", -1]) == 1
    assert client.exists(miss) == 1  # still occupied on n2
    assert run("channel", [subs, miss], ["n2", -1]) == 0
    assert client.exists(miss) == 0 and client.exists(subs) == 0
    # A presence channel's last member leaving takes it too.
    channel = "presence-cache-y"
    presence = [KEYS.subscriptions("1", channel), KEYS.members("1", channel),
                KEYS.node_members("1", channel, "n1"), KEYS.member_infos("1", channel)]
    miss = KEYS.cache_miss("1", channel)
    run("join", presence, ["n1", "u1", "{}", 100])
    assert run("miss", [presence[0], miss], [MISS_TTL]) == 1
    assert run("miss", [presence[0], miss], [MISS_TTL]) == 0
    assert run("leave", presence + [miss], ["n1", "u1"]) == [0, 0]
    assert client.keys("*") == []


BUS_CHURN = """
import sys
from gevent import monkey
monkey.patch_all()
import gevent
import redis
from bunpulse.adapters.redis.bus import Bus, SingleRedis

def ignore(*args):
    pass

bus = Bus(SingleRedis(sys.argv[1]), "0123456789abcdef", ignore, ignore, ignore)
bus.start("bp:{bp}:control")
while not any(link.up for link in bus.links.values()):
    gevent.sleep(0.01)
for n in range(1000):  # joined and left before the writer's turn
    bus.want(f"churn-{n}", ("1", f"churn-{n}"))
    bus.drop(f"churn-{n}")
for n in range(1000, 1200):  # and after it
    bus.want(f"churn-{n}", ("1", f"churn-{n}")).wait(2)
    bus.drop(f"churn-{n}")
gevent.sleep(0.5)
link = next(iter(bus.links.values()))
print(len(bus.wanted), len(link.waiters), len(link.subscribed), len(link.dirty),
      len(link.unsubscribing), len(redis.Redis.from_url(sys.argv[1]).pubsub_channels()))
"""


def test_the_relay_keeps_nothing_of_channels_joined_and_left(redis_server):
    """The interest-based relay: a node that got and lost a channel's last subscriber holds
    nothing of it (its wanted entry, the subscription's waiter, its Redis subscription),
    however quickly the two came. A real gevent process on a real Redis."""
    answer = subprocess.run([sys.executable, "-c", BUS_CHURN, redis_server.url], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0, answer.stderr
    # wanted, waiters, subscribed, dirty, unsubscribing, Redis's pub/sub channels: the
    # control channel alone
    assert list(map(int, answer.stdout.split())) == [1, 0, 1, 0, 0, 1]
