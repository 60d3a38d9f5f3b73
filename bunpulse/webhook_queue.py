"""Durable webhooks: with Redis, the delay and every target's queue live in Redis.

- Queue: a stream per (app, target URL and headers), on the app's hash tag (Keys.webhook_*).
  An entry is deleted only once delivered, so a worker killed mid-batch loses nothing.
- Who sends: any worker. A target's head batch is taken under a lease (a lock that expires
  webhook timeout + 2 s after it is taken), one batch at a time, so batches go out in order;
  the worker that queued an event tries at once, and every worker looks at every target of
  every app each POLL seconds, which is how a dead worker's batch is taken over.
- Repeats: the batch taken first is the one retried, whole, under the same id
  (webhooks.DELIVERY_ID, derived from its entries' ids), by whichever worker sends it next;
  its retry schedule (next try, backoff, deadline) is in Redis, so it survives restarts.
- Delay: channel_vacated/member_removed wait in a hash and a sorted set of the app; the
  matching return cancels them there, whichever worker sees it. One script moves what is due
  into the queues (scripts.py).
- Redis down: events wait in this worker's memory (at most webhook_queue_size) and go to
  Redis, in order, once it is back. What Redis held survives its restart as far as Redis
  persists it (appendonly).
"""
import hashlib
import logging
import threading
import time
from collections import deque

import orjson

from .adapters.redis.adapter import RedisDown
from .adapters.redis.bus import FAILURES
from .config import redacted
from .deadline_post import deadline_session
from .webhooks import CANCELS, DELAYED, FIRST_BACKOFF, MAX_BACKOFF, post_batch

log = logging.getLogger("bunpulse.webhooks")

POLL = 1.0          # seconds between two looks at every target (a dead worker's, retries due)
LEASE_EXTRA = 2000  # ms a batch's lease outlasts the request's deadline


def target_name(target):
    """A target's queue name: its URL and headers (what a request depends on). A filter or
    event types changed keep the queue; a new URL or header starts another."""
    digest = hashlib.sha256(orjson.dumps([target.url, list(target.headers)]))
    return digest.hexdigest()[:16]


def identity(name, event):
    """What a delayed event and the return that cancels it share."""
    return "\x1f".join((name, event.get("channel") or "", event.get("user_id") or ""))


class DurableWebhooks:
    def __init__(self, adapter, settings):
        self.adapter = adapter
        self.keys = adapter.keys
        self.node = adapter.node
        self.delay_ms = settings.webhook_delay_ms
        self.lease_ms = settings.webhook_timeout_ms + LEASE_EXTRA
        self.limit = settings.webhook_queue_size
        self.owner = None
        self._apps = lambda: ()
        self._senders = {}          # (app id, target name) -> _QueueSender
        self._held = deque()        # (app, event) waiting for Redis to come back
        self._held_dropped = 0
        self._full = set()          # queues logged as full (once until they drain)
        self._tick = threading.Event()
        self._next_due = None       # monotonic time of the earliest delay this worker set
        self._running = True
        self._lock = threading.Lock()

    def bind(self, owner):
        self.owner = owner

    def start(self, apps):
        self._apps = apps
        threading.Thread(target=self._sweep, name="bunpulse-webhook-sweep", daemon=True).start()

    def close(self):
        self._running = False
        self._tick.set()
        for sender in list(self._senders.values()):
            sender.close()

    def idle(self):
        return not self._held

    # ---------------------------------------------------------------- from the dispatcher

    def accept(self, app, event):
        """Delay, cancel or queue one event (the dispatcher's thread)."""
        if self._held:  # Redis was down: keep the order
            self._hold(app, event)
            return
        try:
            self._accept(app, event)
        except (RedisDown, *FAILURES) as exc:
            self._failed(exc)
            self._hold(app, event)

    def _accept(self, app, event):
        name = event["name"]
        delayed, due = self.keys.webhook_delayed(app.id), self.keys.webhook_due(app.id)
        if name in CANCELS and self.adapter.eval(
                "wh_cancel", [delayed, due], [identity(CANCELS[name], event)]):
            return  # back in time: neither the removal nor this return is reported
        queues = self._queues(app, event)
        if not queues:
            return
        if name in DELAYED and self.delay_ms > 0:
            held = orjson.dumps({"e": orjson.dumps(event).decode(),
                                 "q": [self.keys.webhook_queue(app.id, q) for q in queues]})
            if self.adapter.eval("wh_delay", [delayed, due], [
                    identity(name, event), held, int(time.time() * 1000) + self.delay_ms,
                    self.limit]):
                self._due_in(self.delay_ms / 1000)
                return
        body = orjson.dumps(event)
        for queue in queues:
            added = self.adapter.eval("wh_add", [self.keys.webhook_queue(app.id, queue)],
                                      [self.limit, body])
            self._added(app, queue, added is not None, event)

    def _queues(self, app, event):
        names = []
        for target in app.webhooks:
            if target.takes(event):  # its event types and its channel filter
                names.append(target_name(target))
        return names

    def _added(self, app, queue, added, event):
        if added:
            self._full.discard((app.id, queue))
            self._sender(app.id, queue).nudge()
            return
        self.owner.metrics.app(app.id).webhooks_dropped("queue_full").inc()
        self.owner.report(app, "dropped", [event])
        if (app.id, queue) not in self._full:
            self._full.add((app.id, queue))
            log.warning("webhook queue %s of app %s is full (%d events): dropping new events",
                        queue, app.id, self.limit)

    def _hold(self, app, event):
        if len(self._held) < self.limit:
            self._held.append((app, event))
            return
        self._held_dropped += 1
        self.owner.metrics.app(app.id).webhooks_dropped("queue_full").inc()
        self.owner.report(app, "dropped", [event])
        if self._held_dropped == 1 or self._held_dropped % 10000 == 0:
            log.warning("Redis is down and %d webhook events wait for it: %d dropped so far",
                        self.limit, self._held_dropped)

    def _failed(self, exc):
        if isinstance(exc, FAILURES):
            self.adapter.down(exc)  # reconnects, and loads the scripts again (NOSCRIPT)

    def _due_in(self, seconds):
        due = time.monotonic() + seconds
        if self._next_due is None or due < self._next_due:
            self._next_due = due
            self._tick.set()

    # ---------------------------------------------------------------- every POLL seconds

    def _sweep(self):
        while self._running:
            wait = POLL
            if self._next_due is not None:
                wait = max(0.0, min(wait, self._next_due - time.monotonic()))
            self._tick.wait(wait)
            self._tick.clear()
            if not self._running:
                return
            if self._next_due is not None and self._next_due <= time.monotonic():
                self._next_due = None
            try:
                self._release_held()
                self._look()
            except (RedisDown, *FAILURES) as exc:
                self._failed(exc)
            except Exception:  # noqa: BLE001 - the sweep goes on
                log.exception("webhook sweep failed")

    def _release_held(self):
        while self._held:
            app, event = self._held[0]
            self._accept(app, event)  # raises while Redis is still down: kept, in order
            self._held.popleft()
        self._held_dropped = 0

    def _look(self):
        now = int(time.time() * 1000)
        for app in list(self._apps()):
            if not app.webhooks:
                continue
            for queue in self.adapter.eval("wh_due", [self.keys.webhook_delayed(app.id),
                                                      self.keys.webhook_due(app.id)],
                                           [now, self.limit, 1000]):
                queue = queue.decode() if isinstance(queue, bytes) else queue
                if queue.startswith("!"):  # the target's queue was full: dropped there
                    self.owner.metrics.app(app.id).webhooks_dropped("queue_full").inc()
                    log.warning("webhook queue %s is full (%d events): a delayed event "
                                "was dropped", queue[1:], self.limit)
                else:
                    self._sender(app.id, queue.rpartition(":")[2]).nudge()
            for target in app.webhooks:
                self._sender(app.id, target_name(target)).wake.set()

    def _sender(self, app_id, queue):
        sender = self._senders.get((app_id, queue))
        if sender is None:
            with self._lock:
                sender = self._senders.get((app_id, queue))
                if sender is None:
                    sender = self._senders[(app_id, queue)] = _QueueSender(self, app_id, queue)
        return sender


class _QueueSender:
    """This worker's sender for one target's queue: takes the head batch when no other worker
    holds it and its retry is due, sends it once, and reports back to Redis."""

    def __init__(self, owner, app_id, name):
        self.owner = owner
        self.app_id = app_id
        self.name = name
        keys = owner.keys
        self.keys = [keys.webhook_queue(app_id, name), keys.webhook_lock(app_id, name),
                     keys.webhook_retry(app_id, name)]
        self.session = deadline_session()
        self.wake = threading.Event()
        self.added = 0  # events this worker queued since its last take
        self.running = True
        threading.Thread(target=self._run, name=f"bunpulse-webhook-{name}", daemon=True).start()

    def nudge(self):
        self.added += 1
        self.wake.set()

    def close(self):
        self.running = False
        self.wake.set()

    def _run(self):
        timeout = None
        while self.running:
            self.wake.wait(timeout)
            self.wake.clear()
            timeout = None
            sender = self.owner.owner
            if 0 < self.added < sender.batch_size and sender.batch_window:
                time.sleep(sender.batch_window)  # let a burst gather into one request
            self.added = 0
            try:
                timeout = self._send_what_is_due()
            except (RedisDown, *FAILURES) as exc:
                self.owner._failed(exc)
            except Exception:  # noqa: BLE001 - the sender goes on
                log.exception("webhook sender failed")

    def _send_what_is_due(self):
        """Send batches until none is left to this worker; the seconds until its retry is
        due, or None."""
        owner = self.owner
        while self.running:
            now = int(time.time() * 1000)
            taken = owner.adapter.eval("wh_take", self.keys, [
                owner.node, owner.lease_ms, now, owner.owner.batch_size])
            if taken[0] in (0, 1):  # nothing queued, or another worker sends it
                return None
            if taken[0] == 2:
                return max(0.0, (int(taken[1]) - now) / 1000)
            self._send([(entry_id, fields) for entry_id, fields in taken[1]])
        return None

    def _send(self, entries):
        owner, sender = self.owner, self.owner.owner
        app = next((a for a in owner._apps() if a.id == self.app_id), None)
        target = None if app is None else next(
            (t for t in app.webhooks if target_name(t) == self.name), None)
        ids = [entry_id for entry_id, _ in entries]
        if target is None:  # the app or the target is gone: nobody to send its events to
            owner.adapter.eval("wh_done", self.keys, [owner.node, *ids])
            return
        batch = [orjson.loads(dict(zip(fields[::2], fields[1::2]))[b"e"])
                 for _, fields in entries]
        first, last = ids[0], ids[-1]
        delivery_id = hashlib.sha256(b"|".join(
            [self.keys[0].encode(), _bytes(first), _bytes(last)])).hexdigest()[:32]
        shown = redacted(target.url)
        metrics = sender.metrics.app(app.id)
        if post_batch(self.session, sender.timeout, target.url, dict(target.headers), app,
                      batch, delivery_id, shown):
            owner.adapter.eval("wh_done", self.keys, [owner.node, *ids])
            metrics.webhooks_sent_total.inc(len(batch))
            sender.report(app, "sent", batch)
            return
        metrics.webhooks_failed_total.inc()
        sender.report(app, "failed", batch)
        if not owner.adapter.eval("wh_failed", self.keys[1:], [
                owner.node, int(time.time() * 1000), int(FIRST_BACKOFF * 1000),
                int(MAX_BACKOFF * 1000), int(sender.retry_for * 1000)]):
            owner.adapter.eval("wh_done", self.keys, [owner.node, *ids])
            metrics.webhooks_dropped("retries_exhausted").inc(len(batch))
            sender.report(app, "dropped", batch)
            log.error("webhook to %s failed for %s s: dropped %d events", shown,
                      sender.retry_for, len(batch))


def _bytes(value):
    return value if isinstance(value, bytes) else str(value).encode()
