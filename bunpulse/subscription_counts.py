"""`pusher_internal:subscription_count`: tell a channel's subscribers how many it has.

For apps with `subscription_count` on, every subscriber of a non-presence channel (presence
channels have member events instead, as on Pusher) gets
`{"subscription_count": N}`, N the deployment-wide count, when the count changes.

The rule, per channel and per node: at most one message every INTERVAL seconds. A change in a
quiet channel is sent at once (leading edge); the changes that come while the channel cools
down are sent as one message when the interval ends (trailing edge), with the count read
then, so the last count a subscriber gets is always the current one. A channel of any size
and churn costs each subscriber at most 1 / INTERVAL messages a second.

Across nodes (Redis): the node where the count changed also sends the other nodes a notice
(adapter.count_changed, at the same throttled rate); each node then reads the count itself and
tells its own subscribers, under the same rule. A node reads the count after the notice that
made it send, so no node ends on a stale count, whatever order the nodes' messages cross in.
"""
import logging

import gevent

from . import protocol
from .frames import build_frame
from .protocol import channel_kind

log = logging.getLogger("bunpulse")

INTERVAL = 1.0  # seconds between two messages to one channel's subscribers on a node

# A channel's state while it is sent or cools down (no entry: quiet).
_CLEAN = 0     # nothing changed since the last message
_DIRTY = 1     # changed: send when the interval ends
_NOTIFY = 2    # changed here: tell the other nodes too


class SubscriptionCounts:
    """Sends the throttled count messages of one worker (see the module's rule)."""

    def __init__(self, core, interval=INTERVAL):
        self.core = core
        self.interval = interval
        self._channels = {}  # (app_id, channel) -> _CLEAN | _DIRTY [| _NOTIFY]

    @staticmethod
    def wanted(app, channel):
        return app.subscription_count and not channel_kind(channel).presence

    def changed(self, app, channel):
        """A subscription of this node to `channel` began or ended."""
        if self.wanted(app, channel):
            self._mark((app.id, channel), _DIRTY | _NOTIFY)

    def changed_elsewhere(self, app_id, channel):
        """Another node said the count changed: tell this node's subscribers."""
        app = self.core.apps.by_id(app_id)
        if app is not None and self.wanted(app, channel):
            self._mark((app_id, channel), _DIRTY)

    def _mark(self, key, flags):
        state = self._channels.get(key)
        if state is None:  # quiet: send now, in a greenlet (the caller may be the event loop)
            self._channels[key] = flags
            gevent.spawn(self._run, key)
        else:
            self._channels[key] = state | flags

    def _run(self, key):
        try:
            while self._channels[key] != _CLEAN:
                flags = self._channels[key]
                self._channels[key] = _CLEAN  # what changes from here is sent next time
                self._send(key, flags & _NOTIFY)
                gevent.sleep(self.interval)
        finally:
            del self._channels[key]

    def _send(self, key, notify):
        app_id, channel = key
        adapter = self.core.adapter
        try:
            if notify:
                adapter.count_changed(app_id, channel)
            if self.core.hub.channel(app_id, channel) is None:
                return  # no subscriber here
            count = adapter.subscription_count(app_id, channel)
            if count:
                self.core.hub.broadcast(app_id, channel,
                                        build_frame(protocol.subscription_count(channel, count)))
        except Exception:  # one channel's failure must not end the others' messages
            log.exception("subscription_count of %s in app %s", channel, app_id)
