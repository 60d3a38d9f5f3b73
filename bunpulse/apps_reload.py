"""The apps file re-read in place when it changes, without a restart (a key rotation, a new
app): `LiveApps` answers like an AppRegistry and looks at the file's stat at most once per
`--apps-file-reload` seconds, from the lookup that comes due, in whatever process, worker or
thread does it. A lookup, not a timer: every way of running gets it with no greenlet or thread
of its own, and a steady-state lookup costs one clock read. (The core adds a timer of its own
in the hub that serves connections, so that a removed app's are closed with no lookup coming:
BunPulse._watch_apps.)"""
import logging
import os
import time

from .apps import load_apps
from .config import ConfigError

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
