"""Dashboard sessions, kept on the server: the cookie carries only a random session id, and a
session is live only while the store holds it. Signing out deletes it, so a copied cookie is
worth nothing afterwards, restart or not.

- Without Redis: this process's memory. A restart signs everyone out (nothing to forget).
- With Redis: `PREFIX:dash:session:{id}` (PREFIX: --redis-key-prefix) (app id and expiry, expiring with the session), shared by
  every worker and node, kept across restarts. When Redis does not answer, no session is
  accepted (SessionStoreDown: the dashboard answers 503), never one that may be signed out."""
import secrets
import time

import orjson
import redis

MAX_SESSIONS = 10000   # sessions one process keeps without Redis; past it the oldest go


class SessionStoreDown(Exception):
    """The store (Redis) did not answer: the session can be neither checked nor changed."""


def _new_id():
    return secrets.token_urlsafe(18)


class MemorySessions:
    def __init__(self, limit=MAX_SESSIONS):
        self.limit = limit
        self._live = {}  # session id -> (app id, expires at), oldest first

    def create(self, app_id, expires_at):
        now = time.time()
        if len(self._live) >= self.limit:
            self._live = {sid: entry for sid, entry in self._live.items() if entry[1] > now}
            while len(self._live) >= self.limit:
                del self._live[next(iter(self._live))]
        session_id = _new_id()
        self._live[session_id] = (app_id, expires_at)
        return session_id

    def lookup(self, session_id):
        """(app id, expires at) of a live session, else None."""
        entry = self._live.get(session_id)
        if entry is None or entry[1] <= time.time():
            return None
        return entry

    def end(self, session_id):
        self._live.pop(session_id, None)


class RedisSessions:
    def __init__(self, client, space):
        self.redis = client
        self.space = space  # "PREFIX:dash": --redis-key-prefix's, as the relay's keys

    def _key(self, session_id):
        return f"{self.space}:session:{session_id}"

    def create(self, app_id, expires_at):
        session_id = _new_id()
        ttl = max(1, int(expires_at - time.time()))
        self._call(self.redis.set, self._key(session_id), orjson.dumps([app_id, expires_at]),
                   ex=ttl)
        return session_id

    def lookup(self, session_id):
        raw = self._call(self.redis.get, self._key(session_id))
        if raw is None:
            return None
        app_id, expires_at = orjson.loads(raw)
        return None if expires_at <= time.time() else (app_id, expires_at)

    def end(self, session_id):
        self._call(self.redis.delete, self._key(session_id))

    @staticmethod
    def _call(command, *args, **kwargs):
        try:
            return command(*args, **kwargs)
        except redis.RedisError as exc:
            raise SessionStoreDown(str(exc)) from None
