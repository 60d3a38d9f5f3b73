"""The in-process adapter: this worker is the whole deployment."""
from ..errors import PresenceFull
from .base import Adapter


class LocalAdapter(Adapter):
    """Every call answered by this worker's hub (see Adapter for what each returns)."""

    def __init__(self, hub):
        self.hub = hub

    # ---------------------------------------------------------------- connections

    def add_connection(self, conn):
        self.hub.add_connection(conn)

    def connection_count(self, app_id):
        return self.hub.connection_count(app_id)

    def remove_connection(self, conn):
        return self.hub.remove_connection(conn)

    # ---------------------------------------------------------------- delivery

    def publish(self, app_id, channel, frame, except_socket_id=None):
        return self.hub.broadcast(app_id, channel, frame, except_socket_id)

    def tell_watchers(self, app_id, user_id, frame):
        for conn in self.hub.watchers(app_id, user_id):
            conn.outbox.send(frame)

    def terminate_user(self, app_id, user_id):
        for conn in self.hub.user_connections(app_id, user_id):
            conn.terminate()

    # ---------------------------------------------------------------- membership

    def subscribe(self, conn, channel, member=None, limit=None):
        if member is not None and limit is not None and \
                not self.hub.has_member(conn.app.id, channel, member[0]) and \
                LocalAdapter.member_count(self, conn.app.id, channel) >= limit:
            raise PresenceFull(channel)
        occupied, added = self.hub.subscribe(conn, channel, member)
        roster = None if member is None else LocalAdapter.members(self, conn.app.id, channel)
        return occupied, added, roster

    def unsubscribe(self, conn, channel):
        return self.hub.unsubscribe(conn, channel)

    def sign_in(self, conn, user_id):
        return self.hub.sign_in(conn, user_id)

    def watch(self, conn, user_ids):
        self.hub.watch(conn, user_ids)

    def user_online(self, app_id, user_id):
        return self.hub.user_online(app_id, user_id)

    # ---------------------------------------------------------------- queries

    def channel_counts(self, app_id):
        return {name: (len(ch.subscribers), len(ch.members))
                for name, ch in self.hub.channels(app_id).items()}

    def subscription_count(self, app_id, channel):
        ch = self.hub.channel(app_id, channel)
        return len(ch.subscribers) if ch else 0

    def members(self, app_id, channel):
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
        return self.hub.first_cache_miss(app_id, channel)
