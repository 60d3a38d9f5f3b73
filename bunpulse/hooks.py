"""The callbacks of `server.on(event, callback)` (`Hooks`) and socket ids (`SocketIds`)."""
import logging
import os
import secrets
from itertools import count

log = logging.getLogger("bunpulse")


class SocketIds:
    """`<process>.<counter>` ids: the random process part keeps them unique across workers and
    machines, and is drawn anew after a fork."""

    def __init__(self):
        self._pid = None

    def __call__(self):
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._prefix = str(secrets.randbelow(9 * 10 ** 9) + 10 ** 9)
            self._counter = count(1)
        return f"{self._prefix}.{next(self._counter)}"


class Hooks:
    """`server.on(event, callback)`: callbacks get (connection, data); errors are logged."""

    def __init__(self):
        self._callbacks = {}

    def on(self, event, callback):
        self._callbacks.setdefault(event, []).append(callback)
        return callback

    def wanted(self, event):
        return event in self._callbacks

    def emit(self, event, conn, data):
        for callback in self._callbacks.get(event, ()):
            try:
                callback(conn, data)
            except Exception:  # noqa: BLE001 - a user callback never takes the server down
                log.exception("callback for %r failed", event)
