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
# At the limit, one closing connection lets one accept through before the next fails: the
# limit is called over only once accept() has not failed for this long.
QUIET = 1.0


class PausingAccept:
    """Mix into a gevent StreamServer (pywsgi.WSGIServer or gunicorn's) before it."""

    _paused_since = None   # when accept() first failed for want of descriptors
    _last_failure = None
    _pause_delay = FIRST_DELAY
    _recovery = None       # the timer that checks the limit is over

    def do_read(self):
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno not in OUT_OF_DESCRIPTORS:
                raise
            self._pause_accepting(exc)
            return None
        if accepted and self._paused_since is not None and self._recovery is None:
            self._recovery = self.loop.timer(QUIET)
            self._recovery.start(self._check_recovered)
        return accepted

    def _pause_accepting(self, exc):
        self._last_failure = time.monotonic()
        if self._paused_since is None:
            self._paused_since = self._last_failure
            log.warning("out of file descriptors (%s): accepting paused until connections "
                        "close; new clients wait in the listen backlog", exc.strerror or exc)
        self.stop_accepting()
        self._timer = self.loop.timer(self._pause_delay)
        self._timer.start(self._start_accepting_if_started)
        self._pause_delay = min(MAX_DELAY, self._pause_delay * 2)

    def _check_recovered(self):
        self._recovery.close()
        self._recovery = None
        if time.monotonic() - self._last_failure < QUIET:
            return  # failed again meanwhile: the next accept looks again
        log.warning("accepting connections again after %.1f s at the file-descriptor limit",
                    self._last_failure - self._paused_since)
        self._paused_since = None
        self._pause_delay = FIRST_DELAY
