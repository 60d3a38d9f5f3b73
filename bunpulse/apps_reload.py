"""The apps file re-read in place when it changes, without a restart (a key rotation, a new
app): `LiveApps` answers like an AppRegistry and looks at the file's stat at most once per
`--apps-file-reload` seconds, from the lookup that comes due, in whatever process, worker or
thread does it. A lookup, not a timer: every way of running gets it with no greenlet or thread
of its own, and a steady-state lookup costs one clock read. `FollowReloads` is what a reload does to one worker's open
connections; it adds a timer in the hub that serves them, so that a removed app's are closed with
no lookup coming.)"""
import logging
import os
import time

import gevent

from .apps import load_apps
from .config import ConfigError
from .errors import ErrorCode

log = logging.getLogger("bunpulse")


def live_apps(settings):
    """The apps of a deployment: re-read when the apps file changes, unless it is read once."""
    apps = load_apps(settings)
    if not settings.apps_file or not settings.apps_file_reload:
        return apps
    return LiveApps(settings, apps)


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class LiveApps:
    def __init__(self, settings, apps):
        self._settings = settings
        self._apps = apps
        self._path = settings.apps_file
        self._every = settings.apps_file_reload
        self._stamp = _stamp(self._path)
        self._due = time.monotonic() + self._every
        self._refused = None  # the stamp of a version that failed to load: logged once
        self.on_reload = None  # called with (old, new) registries after a change is taken

    def _fresh(self):
        now = time.monotonic()
        if now >= self._due:
            self._due = now + self._every
            stamp = _stamp(self._path)
            if stamp != self._stamp:
                self._reload(stamp)
        return self._apps

    def _reload(self, stamp):
        try:
            apps = load_apps(self._settings)
        except ConfigError as exc:
            # Half-written, mistyped or gone: the apps already loaded go on being served.
            if stamp != self._refused:
                self._refused = stamp
                log.error("apps file not reloaded, the apps loaded before are still served: "
                          "%s", exc, extra={"event": "apps_reload_failed"})
            return
        old, self._apps, self._stamp, self._refused = self._apps, apps, stamp, None
        log.info("apps file reloaded: %s", _changes(old, apps),
                 extra={"event": "apps_reloaded", "apps": [app.id for app in apps]})
        if self.on_reload is not None:
            self.on_reload(old, apps)

    # ---------------------------------------------------------------- AppRegistry's answers

    def by_key(self, key):
        return self._fresh().by_key(key)

    def by_id(self, app_id):
        return self._fresh().by_id(app_id)

    def __iter__(self):
        return iter(self._fresh())

    def __len__(self):
        return len(self._fresh())


def _changes(old, new):
    """What a reload changed, for its log line (ids and keys, never a secret)."""
    before, after = {app.id: app for app in old}, {app.id: app for app in new}
    parts = [f"{len(after)} app(s)"]
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(i for i in set(before) & set(after) if before[i] != after[i])
    for label, ids in (("added", added), ("removed", removed), ("changed", changed)):
        if ids:
            parts.append(f"{label} {', '.join(ids)}")
    return "; ".join(parts)


class FollowReloads:
    """What a reload of the apps file does to one worker (`core`): open connections take
    their app's new record (its keys: a subscription signed with a pair added since they
    connected; its webhooks and limits), webhooks are signed with the app's record of now, and
    the connections of an app removed or disabled are closed, in the hub that serves them."""

    def __init__(self, core):
        self.core = core
        self._loop = None   # the hub serving the connections, from the first one on
        self._timer = None  # its look at the apps file
        core.apps.on_reload = self.reloaded
        core.webhooks.current = lambda app: core.apps.by_id(app.id) or app

    @property
    def watching(self):
        return self._loop is not None

    def reloaded(self, old, new):
        """A lookup from a host application's thread (flask run) may get here while the hub
        thread changes the connections: those left out take the new record at their next
        subscription (Connection.refresh_app), and the hub's own pass closes the gone ones."""
        if self._loop is not None:  # else no connection was ever served: none to close
            self._loop.run_callback_threadsafe(gevent.spawn_raw, self._close_gone, new)
        try:
            connections = self.core.hub.connections()
        except RuntimeError:  # a dict changed size under another thread's iteration
            return
        for conn in connections:
            record = new.by_id(conn.app.id)
            if record is not None and record.enabled:
                conn.app = record

    def _close_gone(self, apps):
        """Close the connections of an app that `apps` no longer has, or has disabled, as a
        connect of that app is refused at admission: pusher:error, then 4001 or 4003."""
        for conn in self.core.hub.connections():
            record = apps.by_id(conn.app.id)
            if conn.closed or (record is not None and record.enabled):
                continue
            if record is None:
                conn.refuse(ErrorCode.APP_NOT_FOUND, f"App {conn.app.id} does not exist.")
            else:
                conn.refuse(ErrorCode.APP_DISABLED, "Application is disabled")

    def watch(self):
        """Look at the apps file now and then from the hub that serves the connections (the
        first one served starts it), so that a worker with no lookup coming still closes a
        removed or disabled app's connections within --apps-file-reload seconds."""
        self._loop = gevent.get_hub().loop
        every = self.core.settings.apps_file_reload
        self._timer = timer = self._loop.timer(every, every)
        timer.ref = False  # never what keeps a hub alive
        timer.start(self.core.apps.__len__)  # a lookup: it reads the file when it is due

    def stop(self):
        if self._timer is not None:
            self._timer.stop()
