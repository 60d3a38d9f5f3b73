"""The dashboard across workers and nodes, through the adapter's Redis.

PREFIX is --redis-key-prefix (`bp` by default).
- Who watches: each worker with a viewer of an app keeps `PREFIX:dash:watching` (a sorted
  set, app id -> expiry) fresh, and announces a new viewer on the `PREFIX:dash` pub/sub
  channel so that every worker starts reporting at once. A worker reports an app's events
  only while some viewer anywhere watches it.
- Log records: published on `PREFIX:dash` with the sender's node id; each worker hands the
  others' records to its own viewers.
- Charts: each worker appends its per-second samples to a list of its own per app
  (`PREFIX:dash:ring:{app}:{node}`, an hour kept); a chart sums the lists by second.
- Sessions live in Redis (sessions.py); a sign-out is announced so that the session's streams
  end on every worker.
Redis being down costs the other workers' share of the view, and sessions: none is accepted
until Redis answers again (sessions.py)."""
import logging
import secrets
import time

import gevent
import orjson
import redis

from .stats import HISTORY

log = logging.getLogger("bunpulse.dashboard")

WATCH_TTL = 10.0        # seconds a viewer's mark lasts without being refreshed


class RedisRelay:
    def __init__(self, feed):
        self.feed = feed
        # Every key and the channel begin with --redis-key-prefix ("bp" in the names above):
        # two deployments on one Redis see neither the other's viewers nor its records.
        self.space = f"{feed.core.settings.redis_key_prefix}:dash"
        self.watching = feed.core.watching
        self.node = secrets.token_hex(8)
        self.redis = redis.Redis.from_url(feed.core.settings.redis_url, socket_connect_timeout=1,
                                          socket_timeout=3)
        self.remote = {}   # app id -> when the last mark from another worker expires
        self._greenlet = None

    def start(self):
        self._greenlet = gevent.spawn(self._listen)

    def stop(self):
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def _send(self, kind, app_id, payload=None):
        try:
            self.redis.publish(self.space, orjson.dumps([self.node, kind, app_id, payload]))
        except redis.RedisError as exc:
            log.warning("dashboard relay: %s", exc)

    # ---------------------------------------------------------------- who watches

    def watch(self, app_id):
        try:
            self.redis.zadd(f"{self.space}:watching", {app_id: time.time() + WATCH_TTL})
        except redis.RedisError as exc:
            log.warning("dashboard relay: %s", exc)
        self._send("watch", app_id)

    def watched_elsewhere(self, app_id):
        return self.remote.get(app_id, 0) > time.time()

    def tick(self, samples):
        """Once a second: refresh this worker's marks, learn the others', write samples."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        local = list(self.feed.viewers)
        if local:
            pipe.zadd(f"{self.space}:watching", {app_id: now + WATCH_TTL for app_id in local})
        pipe.zremrangebyscore(f"{self.space}:watching", "-inf", now)
        pipe.zrangebyscore(f"{self.space}:watching", now, "+inf", withscores=True)
        for app_id, sample in samples.items():
            ring = f"{self.space}:ring:{app_id}:{self.node}"
            pipe.rpush(ring, orjson.dumps(sample))
            pipe.ltrim(ring, -HISTORY, -1)
            pipe.expire(ring, HISTORY + 60)
            pipe.sadd(f"{self.space}:rings:{app_id}", self.node)
            pipe.expire(f"{self.space}:rings:{app_id}", HISTORY + 60)
        try:
            results = pipe.execute()
        except redis.RedisError as exc:
            log.warning("dashboard relay: %s", exc)
            return
        marks = results[2 if local else 1]
        self.remote = {raw.decode(): score for raw, score in marks}
        for app_id in list(self.watching):
            if app_id not in self.remote and app_id not in self.feed.viewers:
                self.watching.pop(app_id, None)
        for app_id in self.remote:
            self.watching[app_id] = True

    # ---------------------------------------------------------------- records

    def publish(self, app_id, record):
        self._send("log", app_id, record)

    def revoke(self, session_id):
        self._send("revoke", None, session_id)

    def _listen(self):
        backoff = 0.1
        while True:
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.space)
                backoff = 0.1
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self._on_message(message["data"])
            except redis.RedisError as exc:
                log.warning("dashboard relay: %s", exc)
            except Exception:  # noqa: BLE001 - one bad message must not stop the listener
                log.exception("dashboard relay failed; restarting it")
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001
                        pass
            gevent.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _on_message(self, raw):
        node, kind, app_id, payload = orjson.loads(raw)
        if node == self.node:
            return
        if kind == "log":
            self.feed.deliver(app_id, payload)
        elif kind == "watch":
            self.remote[app_id] = time.time() + WATCH_TTL
            self.watching[app_id] = True
        elif kind == "revoke":
            self.feed.revoke_here(payload)

    # ---------------------------------------------------------------- charts

    def series(self, app_id, since):
        """Every worker's samples of the app after `since`, summed by second; None when
        Redis does not answer."""
        try:
            nodes = [n.decode() for n in self.redis.smembers(f"{self.space}:rings:{app_id}")]
            pipe = self.redis.pipeline(transaction=False)
            for node in nodes:
                pipe.lrange(f"{self.space}:ring:{app_id}:{node}", 0, -1)
            lists = pipe.execute()
        except redis.RedisError as exc:
            log.warning("dashboard relay: %s", exc)
            return None
        merged = {}
        current = int(time.time())  # the workers may not all have written this second yet
        for raw_samples in lists:
            for raw in raw_samples:
                sample = orjson.loads(raw)
                if not since < sample[0] < current:
                    continue
                total = merged.get(sample[0])
                if total is None:
                    merged[sample[0]] = sample
                else:
                    merged[sample[0]] = [sample[0]] + [a + b for a, b in
                                                       zip(total[1:], sample[1:])]
        return [merged[second] for second in sorted(merged)]
