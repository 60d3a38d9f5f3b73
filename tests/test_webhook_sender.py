"""The webhook sender in-process: channel_vacated and member_removed wait for the delay, a
return within it cancels both, and stopping sends what waits at once. A real WebhookSender
posts to a real local HTTP receiver (conftest's WebhookReceiver)."""
import os
import time

import pytest

from bunpulse.apps import App, WebhookTarget
from bunpulse.config import load_settings
from bunpulse.webhooks import WebhookSender

DELAY = 0.4


def make_sender(delay_ms):
    settings = load_settings([], environ={"BUNPULSE_ENV_FILE": os.devnull,
                                          "BUNPULSE_WEBHOOK_DELAY_MS": str(delay_ms),
                                          "BUNPULSE_WEBHOOK_BATCH_MS": "0"})
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
