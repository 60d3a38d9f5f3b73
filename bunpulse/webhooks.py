"""Webhooks: delay, batching, signing and retries, off the hub's path.

`emit` only appends to a queue. A dispatcher applies Pusher's delay to channel_vacated and
member_removed (cancelled, with the matching occupied/added, when the channel or member comes
back in time) and routes each event to the app's targets. Each target has a bounded queue and a
sender that batches, signs and retries with exponential backoff; one batch at a time, so a
receiver that fails and recovers gets every event once and in order.

The workers are threads: under gevent's monkey-patching (the CLI, gunicorn) they are greenlets;
in an unpatched host program (the library API) they are real threads, so a slow receiver never
blocks the server's event loop.

With Redis (`durable`, webhook_queue.py) the delay and the targets' queues live in Redis
instead, so that no worker's crash or restart loses an event; the dispatcher stays.
Every request carries an id (DELIVERY_ID), the same on each repeat of it.
"""
import logging
import queue
import threading
import time
import uuid
from collections import deque

import orjson
import requests

from .config import redacted
from .deadline_post import DeadlineExceeded, deadline_session, post_within
from .metrics import Metrics
from .signatures import webhook_signature

log = logging.getLogger("bunpulse.webhooks")

DELAYED = {"channel_vacated": "channel_occupied", "member_removed": "member_added"}
CANCELS = {again: delayed for delayed, again in DELAYED.items()}
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# Not Pusher's (it sends no id): the same on every repeat of a request, so that a receiver can
# drop repeats. With Redis a request's id survives a worker's restart too.
DELIVERY_ID = "X-BunPulse-Webhook-Id"


def post_batch(session, timeout, url, headers, app, batch, delivery_id, shown):
    """POST one batch of events to a target, signed; whether it was delivered (a 2xx)."""
    # Signed anew on each attempt: validators refuse a time_ms far from now.
    body = orjson.dumps({"time_ms": int(time.time() * 1000), "events": batch})
    headers = {**headers, "Content-Type": "application/json", DELIVERY_ID: delivery_id,
               "X-Pusher-Key": app.key,
               "X-Pusher-Signature": webhook_signature(app.secret, body)}
    try:
        # One deadline for connect, send and the whole answer: a receiver that answers a
        # byte at a time is given up on, and retried, like one that does not answer.
        # A redirect would turn the POST into a GET: a 3xx counts as a failure.
        response = post_within(session, timeout, url, data=body, headers=headers,
                               allow_redirects=False)
    except DeadlineExceeded as exc:
        log.warning("webhook to %s failed: %s", shown, exc)
        return False
    except requests.RequestException as exc:
        log.warning("webhook to %s failed: %s", shown, exc.__class__.__name__)
        return False
    if 200 <= response.status_code < 300:
        return True
    log.warning("webhook to %s answered %d", shown, response.status_code)
    return False


class WebhookSender:
    def __init__(self, settings, metrics=None, durable=None):
        """durable: a DurableWebhooks (webhook_queue.py) holding the delay and the targets'
        queues in Redis; None keeps them in this worker's memory."""
        self.delay = settings.webhook_delay_ms / 1000
        self.batch_window = settings.webhook_batch_ms / 1000
        self.batch_size = settings.webhook_batch_size
        self.retry_for = settings.webhook_retry_seconds
        self.timeout = settings.webhook_timeout_ms / 1000  # the whole of one request
        self.queue_size = settings.webhook_queue_size
        self.metrics = metrics if metrics is not None else Metrics(enabled=False)
        self.dropped_full = 0  # inbox overflows, for the log line
        # observer(app, outcome, events): "sent", "failed" or "dropped" (the dashboard's log)
        self.observer = None
        # current(app): the app's record now (the core's apps, re-read when the apps file
        # changes): a rotation's promoted pair signs what a connection opened before it causes
        self.current = None
        # Bounded too: a connection that floods without blocking starves the dispatcher
        # greenlet, so the inbox, not the targets' queues, would hold the whole flood.
        self._inbox = queue.Queue(self.queue_size)
        self._delayed = {}   # (name, app id, channel, user_id) -> (due, app, event)
        self._targets = {}   # (app id, WebhookTarget) -> _Target
        self._running = True
        self._flushing = False  # stopping: delayed events go at once, batches without waiting
        self._thread = None
        self.durable = durable
        if durable is not None:
            durable.bind(self)

    def start(self, apps):
        """With Redis: from now on, send what any worker queued for `apps()` (a callable: the
        apps may change) and did not deliver, a dead worker's included."""
        if self.durable is not None:
            self.durable.start(apps)

    def wanted(self, app, name):
        """Whether any target of the app takes `name` (or needs it to cancel a delayed one)."""
        wanted_name = CANCELS.get(name, name)
        return any(t.wants(name) or t.wants(wanted_name) for t in app.webhooks)

    def emit(self, app, event):
        """Queue one webhook event; cheap and never blocking."""
        if self.current is not None:
            app = self.current(app)
        if not app.webhooks or not self.wanted(app, event["name"]):
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._dispatch, name="bunpulse-webhooks",
                                            daemon=True)
            self._thread.start()
        try:
            self._inbox.put_nowait((app, event))
        except queue.Full:
            self.dropped_full += 1
            self.metrics.app(app.id).webhooks_dropped("queue_full").inc()
            self.report(app, "dropped", [event])
            if self.dropped_full == 1 or self.dropped_full % 10000 == 0:
                log.warning("webhook inbox is full (%d events): %d events dropped so far",
                            self.queue_size, self.dropped_full)

    def report(self, app, outcome, events):
        if self.observer is not None:
            try:
                self.observer(app, outcome, events)
            except Exception:  # noqa: BLE001 - an observer never stops the webhooks
                log.exception("webhook observer failed")

    def close(self, grace=0.0):
        """Stop sending. With grace, first deliver what is queued (delayed events at once) for
        up to grace seconds, so that a stopping server still reports what its leaving clients
        vacated."""
        if self.durable is not None:  # what is queued waits in Redis: just hand it over
            deadline = time.monotonic() + grace
            while not self._idle() and time.monotonic() < deadline:
                time.sleep(0.02)
            self._running = False
            self._wake()
            self.durable.close()
            return
        if grace and self._thread is not None:
            self._flushing = True
            self._wake()
            deadline = time.monotonic() + grace
            while not self._idle() and time.monotonic() < deadline:
                time.sleep(0.02)
        self._running = False
        self._wake()
        for target in self._targets.values():
            target.close()

    def _wake(self):
        try:
            self._inbox.put_nowait(None)
        except queue.Full:
            pass  # a full inbox wakes the dispatcher anyway

    def _idle(self):
        if self.durable is not None:
            return self._inbox.unfinished_tasks == 0 and self.durable.idle()
        return self._inbox.unfinished_tasks == 0 and not self._delayed and all(
            not t.events and not t.busy for t in self._targets.values())

    # ---------------------------------------------------------------- dispatcher

    def _dispatch(self):
        while self._running:
            timeout = None
            if self._delayed:
                timeout = max(0.0, min(due for due, _, _ in self._delayed.values())
                              - time.monotonic())
            got = True
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                item, got = None, False
            if item is not None:
                (self.durable.accept if self.durable is not None else self._accept)(*item)
            now = float("inf") if self._flushing else time.monotonic()
            for key in [k for k, (due, _, _) in self._delayed.items() if due <= now]:
                _, app, event = self._delayed.pop(key)
                self._route(app, event)
            if got:
                self._inbox.task_done()  # after routing: _idle() counts on it

    def _accept(self, app, event):
        name = event["name"]
        key = (app.id, event.get("channel"), event.get("user_id"))
        if name in CANCELS and self._delayed.pop((CANCELS[name],) + key, None):
            return  # back in time: neither the removal nor this return is reported
        # At most queue_size events wait (one per channel or member left): a client that joins
        # and leaves made-up channels must not grow them with its rate. Past that they go at
        # once, no longer cancelled by a quick return.
        if name in DELAYED and self.delay > 0 and not self._flushing and (
                len(self._delayed) < self.queue_size or (name,) + key in self._delayed):
            self._delayed[(name,) + key] = (time.monotonic() + self.delay, app, event)
            return
        self._route(app, event)

    def _route(self, app, event):
        for target in app.webhooks:
            if target.takes(event):  # its event types and its channel filter
                sender = self._targets.get((app.id, target))
                if sender is None:
                    sender = self._targets[(app.id, target)] = _Target(self, app, target)
                sender.app = app  # the newest record signs: a rotation's promoted pair
                sender.add(event)


class _Target:
    """One receiver of one app: a bounded queue and a sender that batches and retries."""

    def __init__(self, owner, app, target):
        self.owner = owner
        self.app = app
        self.url = target.url
        self.headers = dict(target.headers)  # the target's own, none of them BunPulse's
        self.shown = redacted(self.url)  # for logs: no credentials of the URL
        self.metrics = owner.metrics.app(app.id)
        self.events = deque()
        self.wake = threading.Event()
        self.session = deadline_session()
        self.running = True
        self.busy = False  # a batch is out of the queue and not yet delivered
        self._dropping = False
        threading.Thread(target=self._run, name=f"bunpulse-webhook-{self.shown}",
                         daemon=True).start()

    def add(self, event):
        if len(self.events) >= self.owner.queue_size:
            self.metrics.webhooks_dropped("queue_full").inc()
            self.owner.report(self.app, "dropped", [event])
            if not self._dropping:
                self._dropping = True
                log.warning("webhook queue for %s is full (%d events): dropping new events",
                            self.shown, self.owner.queue_size)
            return
        self.events.append(event)
        self.wake.set()

    def close(self):
        self.running = False
        self.wake.set()

    def _run(self):
        owner = self.owner
        while self.running:
            self.wake.wait()
            self.wake.clear()
            while self.events and self.running:
                if len(self.events) < owner.batch_size and owner.batch_window \
                        and not owner._flushing:
                    time.sleep(owner.batch_window)  # let a burst gather into one request
                self.busy = True
                batch = [self.events.popleft()
                         for _ in range(min(owner.batch_size, len(self.events)))]
                self._deliver(batch)
                self.busy = False
                if len(self.events) < owner.queue_size // 2:
                    self._dropping = False

    def _deliver(self, batch):
        owner = self.owner
        deadline = time.monotonic() + owner.retry_for
        backoff = FIRST_BACKOFF
        delivery_id = uuid.uuid4().hex  # the same on each retry of the batch
        while self.running:
            if post_batch(self.session, owner.timeout, self.url, self.headers, self.app, batch,
                          delivery_id, self.shown):
                self.metrics.webhooks_sent_total.inc(len(batch))
                owner.report(self.app, "sent", batch)
                return
            self.metrics.webhooks_failed_total.inc()
            owner.report(self.app, "failed", batch)
            left = deadline - time.monotonic()
            if left <= 0 or owner._flushing:  # stopping: one try each, no restart held up
                self.metrics.webhooks_dropped("retries_exhausted").inc(len(batch))
                owner.report(self.app, "dropped", batch)
                log.error("webhook to %s failed %s: dropped %d events", self.shown,
                          "while stopping" if owner._flushing else f"for {owner.retry_for} s",
                          len(batch))
                return
            time.sleep(min(backoff, left))
            backoff = min(backoff * 2, MAX_BACKOFF)
