"""The live log: the core reports what happens to the apps someone watches; each viewer (an
open event stream) keeps what it has not sent yet.

The core checks `core.watching` (a dict of app ids) before it builds any record, so an app
nobody watches costs one dict lookup per event. Under Redis, `watching` covers viewers on
every worker (relay.py) and records travel to the workers that serve them."""
import logging
import time
from collections import deque

import gevent

from .sessions import MemorySessions, RedisSessions
from .signin_limit import SignInLimit
from .stats import StatsRing

MAX_DATA = 2048        # characters of event data a log record keeps
VIEWER_BACKLOG = 1000  # records a slow viewer may fall behind before the oldest are dropped

logger = logging.getLogger("bunpulse.dashboard")


def _clip(text):
    return text if len(text) <= MAX_DATA else text[:MAX_DATA] + "…"


class Viewer:
    """One open event stream: the app it shows and the session it belongs to."""

    def __init__(self, app_id, session_id, expires_at):
        self.app_id = app_id
        self.session_id = session_id
        self.expires_at = expires_at
        self.records = deque(maxlen=VIEWER_BACKLOG)
        self.closed = False

    @property
    def done(self):
        return self.closed or time.time() >= self.expires_at


class Feed:
    def __init__(self, core):
        self.core = core
        self.viewers = {}          # app id -> {Viewer: None}
        self.stats = StatsRing(core.hub)
        self.signin_limit = SignInLimit()
        self.relay = None
        self.sessions = MemorySessions()
        if core.settings.redis_url:
            from .relay import RedisRelay  # imported only when used, as the adapter
            self.relay = RedisRelay(self)
            self.sessions = RedisSessions(self.relay.redis, self.relay.space)
        self._greenlet = None
        core.dashboard = self
        core.webhooks.observer = self._webhook

    # ---------------------------------------------------------------- life cycle

    def start(self):
        self._greenlet = gevent.spawn(self._tick)
        if self.relay is not None:
            self.relay.start()

    def stop(self):
        for viewers in self.viewers.values():
            for viewer in viewers:
                viewer.closed = True
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        if self.relay is not None:
            self.relay.stop()

    def _tick(self):
        """Once a second: a stats sample, and (under Redis) who watches where."""
        while True:
            gevent.sleep(1.0 - time.time() % 1.0)
            try:
                sample = self.stats.sample()
                if self.relay is not None:
                    self.relay.tick(sample)
            except Exception:  # noqa: BLE001 - the dashboard never stops the server
                logger.exception("dashboard tick failed")

    # ---------------------------------------------------------------- viewers

    def add_viewer(self, app_id, session_id, expires_at):
        viewer = Viewer(app_id, session_id, expires_at)
        self.viewers.setdefault(app_id, {})[viewer] = None
        self.core.watching[app_id] = True
        if self.relay is not None:
            self.relay.watch(app_id)
        return viewer

    def remove_viewer(self, viewer):
        viewers = self.viewers.get(viewer.app_id, {})
        viewers.pop(viewer, None)
        if not viewers:
            self.viewers.pop(viewer.app_id, None)
            if self.relay is None or not self.relay.watched_elsewhere(viewer.app_id):
                self.core.watching.pop(viewer.app_id, None)

    def revoke(self, session_id):
        """A signed-out session: gone from the store (SessionStoreDown when it cannot be), and
        its streams end, here and (under Redis) on every worker."""
        self.sessions.end(session_id)
        self.revoke_here(session_id)
        if self.relay is not None:
            self.relay.revoke(session_id)

    def revoke_here(self, session_id):
        for viewers in self.viewers.values():
            for viewer in viewers:
                if viewer.session_id == session_id:
                    viewer.closed = True

    def series(self, app_id, since):
        """The charts' samples of the app after `since` (deployment-wide under Redis)."""
        if self.relay is not None:
            merged = self.relay.series(app_id, since)
            if merged is not None:
                return merged
        return self.stats.series(app_id, since)

    # ---------------------------------------------------------------- records

    def log(self, app_id, kind, **fields):
        record = {"time": time.time(), "type": kind}
        record.update((k, v) for k, v in fields.items() if v is not None)
        if "data" in record:
            record["data"] = _clip(record["data"])
        self.deliver(app_id, record)
        if self.relay is not None:
            self.relay.publish(app_id, record)

    def deliver(self, app_id, record):
        for viewer in tuple(self.viewers.get(app_id, ())):
            viewer.records.append(record)

    def closed(self, conn):
        code, reason, by = conn.outbox.close_info or (None, "", "network")
        if by == "evicted":
            self.log(conn.app.id, "eviction", socket_id=conn.socket_id, code=code,
                     reason=reason)
        self.log(conn.app.id, "disconnection", socket_id=conn.socket_id, code=code,
                 reason=reason or None, closed_by=by)

    def subscribed(self, conn, channel, occupied, member):
        app_id = conn.app.id
        if occupied:
            self.log(app_id, "occupied", channel=channel)
        self.log(app_id, "subscribed", socket_id=conn.socket_id, channel=channel)
        if member is not None:
            self.log(app_id, "member_added", channel=channel, user_id=member[0],
                     user_info=member[1])

    def left(self, app_id, channel, vacated, removed):
        if removed is not None:
            self.log(app_id, "member_removed", channel=channel, user_id=removed)
        if vacated:
            self.log(app_id, "vacated", channel=channel)

    def published(self, app_id, channels, event, data, socket_id):
        self.log(app_id, "api_message", channels=list(channels), event=event,
                 size=len(data.encode()), data=data, socket_id=socket_id)

    def _webhook(self, app, outcome, events):
        if app.id in self.core.watching:  # called from the webhook senders
            self.log(app.id, f"webhook_{outcome}",
                     events=[e.get("name") for e in events][:20], count=len(events),
                     channels=sorted({e["channel"] for e in events if "channel" in e})[:20])
