"""Accepting at the file-descriptor limit: pause with back-off, one log line each way.

gevent's server already retries a failed accept() after a growing delay, but prints a traceback
for every failure: at the descriptor limit, a storm of them. Here the limit is reported once
when it is reached and once when a connection is accepted again; the pending clients wait in
the listen backlog meanwhile.
"""
import errno
import logging
import time

log = logging.getLogger("bunpulse")

OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
FIRST_DELAY, MAX_DELAY = 0.05, 1.0  # seconds before accept() is tried again


class PausingAccept:
    """Mix into a gevent StreamServer (pywsgi.WSGIServer or gunicorn's) before it."""

    _paused_since = None
    _pause_delay = FIRST_DELAY

    def do_read(self):
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno not in OUT_OF_DESCRIPTORS:
                raise
            self._pause_accepting(exc)
            return None
        if accepted and self._paused_since is not None:
            log.warning("accepting connections again after %.1f s at the file-descriptor "
                        "limit", time.monotonic() - self._paused_since)
            self._paused_since = None
            self._pause_delay = FIRST_DELAY
        return accepted

    def _pause_accepting(self, exc):
        if self._paused_since is None:
            self._paused_since = time.monotonic()
            log.warning("out of file descriptors (%s): accepting paused until connections "
                        "close; new clients wait in the listen backlog", exc.strerror or exc)
        self.stop_accepting()
        self._timer = self.loop.timer(self._pause_delay)
        self._timer.start(self._start_accepting_if_started)
        self._pause_delay = min(MAX_DELAY, self._pause_delay * 2)
