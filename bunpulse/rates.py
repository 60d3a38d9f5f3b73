"""Per-app HTTP API rates: max_backend_events_per_second and max_read_requests_per_second.

A fixed window of one clock second per app and kind (soketi's rule: at most N points a
second). The windows are the wall clock's seconds, so that every node of a deployment counts
the same second. Without Redis a worker counts alone. With Redis the limit is the
deployment's: a worker leases tokens from the second's counter in Redis in batches (a
twentieth of the limit, at least what the request needs) and spends them locally, so a
publish costs a Redis round trip only when its worker's lease runs out: at most about 20
round trips a second per app and kind across the deployment, plus one per worker and second.
Redis never grants more than the limit in a second; what a worker leased and did not spend
is lost with its second, so the deployment may refuse up to a batch per other worker early.
A worker that saw the second spent refuses until the next one without asking Redis again.
While Redis is unreachable a worker counts alone (the limit then holds per worker).
"""
import time

EVENTS = "events"  # backend events: each channel of each event of a trigger or batch
READS = "reads"    # read requests: GET channels, channel, users
LEASES_PER_SECOND = 20


class _Window:
    __slots__ = ("second", "leased", "left", "spent")

    def __init__(self, second):
        self.second = second
        self.leased = 0      # tokens this worker was granted in this second
        self.left = 0        # of those, not spent yet
        self.spent = False   # the deployment has none left in this second


class ApiRates:
    """The windows of one worker; `take` says whether a request may go on."""

    def __init__(self, adapter):
        self._adapter = adapter
        self._windows = {}  # (app id, kind) -> _Window of the current second

    def take(self, app_id, kind, points, limit):
        """Spend `points` of the app's `limit` for this second: True when they fit."""
        second = int(time.time())
        window = self._windows.get((app_id, kind))
        if window is None or window.second != second:
            window = self._windows[app_id, kind] = _Window(second)
        if window.left >= points:
            window.left -= points
            return True
        if window.spent:
            return False
        wanted = max(points - window.left, limit // LEASES_PER_SECOND)
        granted = self._adapter.lease(app_id, kind, second, wanted, limit)
        if granted is None:  # counted here alone (no Redis, or Redis is down)
            granted = max(0, min(wanted, limit - window.leased))
        window.leased += granted
        window.left += granted
        if granted < wanted:
            window.spent = True
        if window.left < points:
            return False
        window.left -= points
        return True
