"""The adapter interface: where a worker's hub meets the rest of the deployment.

The core calls an adapter and nothing else does. LocalAdapter serves one process; a cluster
adapter (RedisAdapter) answers the same calls for the whole deployment: delivery, counts,
presence, occupied/vacated."""
from abc import ABC, abstractmethod


class Adapter(ABC):
    def bind(self, core):
        """The server core, for adapters that report changes made elsewhere."""

    def start(self):
        pass

    def stop(self):
        pass

    def ready(self):
        """Whether what this adapter depends on (Redis) is reachable: /ready says 503 if not."""
        return True

    def lease(self, app_id, kind, second, wanted, limit):
        """Up to `wanted` of the deployment's `limit` tokens of an app's HTTP API rate
        (rates.py) in the clock `second`: how many were granted, or None when the worker
        counts alone (one process, or Redis unreachable)."""
        return None

    # ---------------------------------------------------------------- connections

    @abstractmethod
    def add_connection(self, conn):
        """A connection was established."""

    @abstractmethod
    def connection_count(self, app_id):
        """Open connections of an app."""

    @abstractmethod
    def remove_connection(self, conn):
        """Returns ([hub.Left], user_id gone offline or None)."""

    # ---------------------------------------------------------------- delivery

    @abstractmethod
    def publish(self, app_id, channel, frame, except_socket_id=None):
        """Deliver a prebuilt WebSocket frame to a channel's subscribers."""

    def count_changed(self, app_id, channel):
        """Tell the other nodes that a channel's subscription count changed here (their
        subscribers get pusher_internal:subscription_count); one node has none to tell."""

    @abstractmethod
    def tell_watchers(self, app_id, user_id, frame):
        """Send a watchlist frame to every connection watching user_id."""

    @abstractmethod
    def terminate_user(self, app_id, user_id):
        """Close every connection of a signed-in user."""

    # ---------------------------------------------------------------- membership

    @abstractmethod
    def subscribe(self, conn, channel, member=None, limit=None):
        """Add a subscription; member is (user_id, user_info) on presence channels, where a
        new user past `limit` members raises errors.PresenceFull. Returns (channel became
        occupied, member is new to the channel, presence roster {user_id: user_info} or
        None)."""

    @abstractmethod
    def unsubscribe(self, conn, channel):
        """Returns None or a hub.Left (channel, vacated, removed user_id or None)."""

    @abstractmethod
    def sign_in(self, conn, user_id):
        """Returns whether the user came online."""

    @abstractmethod
    def watch(self, conn, user_ids):
        """Tell conn when these users come online or go offline."""

    @abstractmethod
    def user_online(self, app_id, user_id):
        """Whether the user has a signed-in connection anywhere."""

    # ---------------------------------------------------------------- queries

    @abstractmethod
    def channel_counts(self, app_id):
        """{channel: (subscription_count, user_count)} for every occupied channel."""

    @abstractmethod
    def subscription_count(self, app_id, channel):
        """Subscriptions to a channel."""

    @abstractmethod
    def members(self, app_id, channel):
        """{user_id: user_info} of a presence channel."""

    @abstractmethod
    def member_count(self, app_id, channel):
        """Users in a presence channel."""

    # ---------------------------------------------------------------- cache channels

    @abstractmethod
    def cache_set(self, app_id, channel, event, data, ttl):
        """Keep a cache channel's last event for ttl seconds."""

    @abstractmethod
    def cache_get(self, app_id, channel):
        """(event, data, seconds left) of a cache channel's last event, or None."""

    @abstractmethod
    def first_cache_miss(self, app_id, channel):
        """Whether to send the cache_miss webhook for a subscriber that found the channel
        empty: True once per occupation of the channel (the deployment's, with Redis) until
        an event fills it. What marks the miss as reported goes when the channel is vacated,
        so that no state is kept for a name nobody is in."""
