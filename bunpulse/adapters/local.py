"""The in-process adapter: this worker is the whole deployment."""


class PresenceFull(Exception):
    """A new user would pass the presence channel's member limit."""


class LocalAdapter:
    def __init__(self, hub):
        self.hub = hub

    def bind(self, core):
        """The server core, for adapters that report changes made elsewhere."""

    def start(self):
        pass

    def stop(self):
        pass

    # ---------------------------------------------------------------- connections

    def add_connection(self, conn):
        self.hub.add_connection(conn)

    def connection_count(self, app_id):
        return self.hub.connection_count(app_id)

    def remove_connection(self, conn):
        """Returns ([Left], user_id gone offline or None)."""
        return self.hub.remove_connection(conn)

    # ---------------------------------------------------------------- delivery

    def publish(self, app_id, channel, frame, except_socket_id=None):
        """Deliver a prebuilt WebSocket frame to a channel's subscribers."""
        return self.hub.broadcast(app_id, channel, frame, except_socket_id)

    def tell_watchers(self, app_id, user_id, frame):
        """Send a watchlist frame to every connection watching user_id."""
        for conn in self.hub.watchers(app_id, user_id):
            conn.outbox.send(frame)

    def terminate_user(self, app_id, user_id):
        for conn in self.hub.user_connections(app_id, user_id):
            conn.terminate()

    # ---------------------------------------------------------------- membership

    def subscribe(self, conn, channel, member=None, limit=None):
        """Add a subscription; member is (user_id, user_info) on presence channels, where a
        new user past `limit` members raises PresenceFull. Returns (channel became occupied,
        member is new to the channel, presence roster {user_id: user_info} or None)."""
        if member is not None and limit is not None and \
                not self.hub.has_member(conn.app.id, channel, member[0]) and \
                LocalAdapter.member_count(self, conn.app.id, channel) >= limit:
            raise PresenceFull(channel)
        occupied, added = self.hub.subscribe(conn, channel, member)
        roster = None if member is None else LocalAdapter.members(self, conn.app.id, channel)
        return occupied, added, roster

    def unsubscribe(self, conn, channel):
        """Returns None or a Left (channel, vacated, removed user_id or None)."""
        return self.hub.unsubscribe(conn, channel)

    def sign_in(self, conn, user_id):
        """Returns whether the user came online."""
        return self.hub.sign_in(conn, user_id)

    def watch(self, conn, user_ids):
        self.hub.watch(conn, user_ids)

    def user_online(self, app_id, user_id):
        return self.hub.user_online(app_id, user_id)

    # ---------------------------------------------------------------- queries

    def channel_counts(self, app_id):
        """{channel: (subscription_count, user_count)} for every occupied channel."""
        return {name: (len(ch.subscribers), len(ch.members))
                for name, ch in self.hub.channels(app_id).items()}

    def subscription_count(self, app_id, channel):
        ch = self.hub.channel(app_id, channel)
        return len(ch.subscribers) if ch else 0

    def members(self, app_id, channel):
        """{user_id: user_info} of a presence channel."""
        ch = self.hub.channel(app_id, channel)
        return {uid: entry[0] for uid, entry in ch.members.items()} if ch else {}

    def member_count(self, app_id, channel):
        ch = self.hub.channel(app_id, channel)
        return len(ch.members) if ch else 0

    # ---------------------------------------------------------------- cache channels

    def cache_set(self, app_id, channel, event, data, ttl):
        self.hub.cache_set(app_id, channel, event, data, ttl)

    def cache_get(self, app_id, channel):
        return self.hub.cache_get(app_id, channel)

    def first_cache_miss(self, app_id, channel):
        """True once per empty cache channel, until an event fills it again."""
        return self.hub.first_cache_miss(app_id, channel)
