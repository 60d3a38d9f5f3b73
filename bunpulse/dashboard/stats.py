"""The charts' figures: once a second, each app's connections and the messages in, messages
out and API calls since the last sample, from the hub's running totals; an hour kept."""
import time
from collections import deque

HISTORY = 3600  # seconds of samples kept


class StatsRing:
    def __init__(self, hub):
        self.hub = hub
        self.rings = {}   # app id -> deque of (second, connections, in, out, api calls)
        self._last = {}   # app id -> (in, out, api calls) totals at the last sample

    def sample(self):
        """Record this second's sample of every app; return {app id: sample} of those with
        anything to show."""
        now = int(time.time())
        fresh = {}
        for app_id, state in self.hub.states():
            totals = (state.messages_in, state.messages_out, state.api_calls)
            last = self._last.get(app_id, (0, 0, 0))
            self._last[app_id] = totals
            sample = (now, len(state.connections), totals[0] - last[0], totals[1] - last[1],
                      totals[2] - last[2])
            if any(sample[1:]) or app_id in self.rings:
                ring = self.rings.get(app_id)
                if ring is None:
                    ring = self.rings[app_id] = deque(maxlen=HISTORY)
                ring.append(sample)
            if any(sample[1:]):
                fresh[app_id] = sample
        return fresh

    def series(self, app_id, since=0):
        return [list(s) for s in self.rings.get(app_id, ()) if s[0] > since]
