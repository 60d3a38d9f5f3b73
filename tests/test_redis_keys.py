"""The Redis key layout: on a cluster, every script's keys must share one slot."""
import inspect

from redis.crc import key_slot

from bunpulse.adapters.redis.scripts import Keys


def slot(key):
    return key_slot(key.encode())


def test_a_channels_keys_and_events_share_one_slot():
    for app_id, channel in (("1", "news"), ("app-id", "presence-room"),
                            ("7", "#server-to-user-42"), ("1", "private-encrypted-x;y=z")):
        keys = [Keys.subscriptions(app_id, channel), Keys.members(app_id, channel),
                Keys.node_members(app_id, channel, "node1"), Keys.member_infos(app_id, channel),
                Keys.cache(app_id, channel), Keys.cache_miss(app_id, channel),
                Keys.events(app_id, channel)]
        assert len({slot(key) for key in keys}) == 1, keys
        assert len(set(keys)) == len(keys)


def test_an_apps_keys_share_one_slot_and_the_deployments_another():
    keys = [Keys.connections("1"), Keys.users("1"), Keys.node_users("1", "n"),
            Keys.occupied("1", "n"), Keys.occupied("1", "m")]
    assert len({slot(key) for key in keys}) == 1
    deployment = [Keys.NODES, Keys.CONTROL, Keys.reap_lock("n")]
    assert len({slot(key) for key in deployment}) == 1


def test_channels_spread_over_slots():
    slots = {slot(Keys.events("1", f"channel-{n}")) for n in range(1000)}
    assert len(slots) > 900  # a cluster shares the channels out between its masters


def test_every_key_kind_is_declared_once_in_keys():
    kinds = [name for name, _ in inspect.getmembers(Keys) if not name.startswith("_")]
    suffixes = []
    for name in kinds:
        member = getattr(Keys, name)
        key = member if isinstance(member, str) else member(
            *["a"] * len(inspect.signature(member).parameters))
        suffixes.append(key.split("}", 1)[1])
    assert len(set(suffixes)) == len(suffixes), suffixes
