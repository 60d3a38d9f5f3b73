"""The webhook sender in-process: channel_vacated and member_removed wait for the delay, a
return within it cancels both, and stopping sends what waits at once. A real WebhookSender
posts to a real local HTTP receiver (conftest's WebhookReceiver)."""
import os
import time

import pytest

from conftest import wait_until
from bunpulse.apps import App, WebhookTarget
from bunpulse.config import load_settings
from bunpulse.webhooks import WebhookSender

DELAY = 0.4


def make_sender(delay_ms, **environ):
    settings = load_settings([], environ={"BUNPULSE_ENV_FILE": os.devnull,
                                          "BUNPULSE_WEBHOOK_DELAY_MS": str(delay_ms),
                                          "BUNPULSE_WEBHOOK_BATCH_MS": "0", **environ})
    return WebhookSender(settings)


@pytest.fixture
def sender():
    sender = make_sender(int(DELAY * 1000))
    yield sender
    sender.close()


@pytest.fixture
def app(webhook_receiver):
    return App(id="1", key="k1", secret="s1", webhooks=(WebhookTarget(webhook_receiver.url),))


def vacated(channel):
    return {"name": "channel_vacated", "channel": channel}


def occupied(channel):
    return {"name": "channel_occupied", "channel": channel}


def member(name, user_id, channel="presence-p"):
    return {"name": f"member_{name}", "channel": channel, "user_id": user_id}


def summary(receiver):
    return [(e["name"], e["channel"], e.get("user_id")) for e in receiver.events()]


def arrival(receiver, name, channel):
    """When the request that carried the event reached the receiver."""
    return next(r["at"] for r in receiver.requests if not r["failed"] and
                f'"name":"{name}","channel":"{channel}"'.encode() in r["body"])


def test_vacated_waits_for_the_delay(sender, app, webhook_receiver):
    start = time.monotonic()
    sender.emit(app, vacated("late"))
    sender.emit(app, occupied("now"))  # not delayed: one target sends in order
    webhook_receiver.wait_events("channel_occupied")
    assert arrival(webhook_receiver, "channel_occupied", "now") < start + DELAY
    assert webhook_receiver.events("channel_vacated") == []  # it would have come first
    webhook_receiver.wait_events("channel_vacated")
    assert arrival(webhook_receiver, "channel_vacated", "late") >= start + DELAY
    assert summary(webhook_receiver) == [("channel_occupied", "now", None),
                                         ("channel_vacated", "late", None)]


def test_a_return_within_the_delay_cancels_both_events(sender, app, webhook_receiver):
    sender.emit(app, vacated("back"))
    sender.emit(app, member("removed", "u1"))
    sender.emit(app, occupied("back"))
    sender.emit(app, member("added", "u1"))
    sender.emit(app, member("added", "u2"))         # cancels nothing: sent at once
    sender.emit(app, member("removed", "u2", "presence-q"))  # another channel: not cancelled
    sender.emit(app, vacated("marker"))  # due after any cancelled event would have been
    webhook_receiver.wait_events("channel_vacated")
    assert summary(webhook_receiver) == [
        ("member_added", "presence-p", "u2"),
        ("member_removed", "presence-q", "u2"),
        ("channel_vacated", "marker", None)]


def test_a_return_after_the_delay_is_reported(sender, app, webhook_receiver):
    sender.emit(app, vacated("c"))
    webhook_receiver.wait_events("channel_vacated")
    sender.emit(app, occupied("c"))
    webhook_receiver.wait_events("channel_occupied")
    assert summary(webhook_receiver) == [("channel_vacated", "c", None),
                                         ("channel_occupied", "c", None)]


def test_closing_sends_delayed_events_at_once(app, webhook_receiver):
    sender = make_sender(60_000)
    start = time.monotonic()
    sender.emit(app, vacated("leaving"))
    sender.emit(app, member("removed", "u1"))
    sender.close(grace=5)
    assert time.monotonic() - start < 5
    assert summary(webhook_receiver) == [("channel_vacated", "leaving", None),
                                         ("member_removed", "presence-p", "u1")]


def test_delayed_events_are_bounded_by_the_queue_size(app, webhook_receiver):
    """Each channel a client leaves makes a channel_vacated that waits for the delay: a client
    churning through made-up channels must not grow them with its rate. Past the queue size
    they go at once (no longer cancelled by a quick return)."""
    sender = make_sender(60_000, BUNPULSE_WEBHOOK_QUEUE_SIZE="100")
    try:
        for start in range(0, 1000, 50):
            for n in range(start, start + 50):
                sender.emit(app, vacated(f"churn-{n}"))
            # paced so that neither the inbox nor the target's queue (100 each) drops any
            wait_until(lambda: sender._inbox.unfinished_tasks == 0 and len(
                webhook_receiver.events("channel_vacated")) >= start - 50,
                message=f"{start - 50} events sent at once")
        assert len(webhook_receiver.events("channel_vacated")) == 900
        assert len(sender._delayed) == 100  # the first hundred wait for their minute
        sender.emit(app, occupied("churn-0"))  # a return within the delay still cancels
        wait_until(lambda: webhook_receiver.events("channel_occupied") == [] and
                   len(sender._delayed) == 99, message="churn-0's return cancelling")
    finally:
        sender.close()
