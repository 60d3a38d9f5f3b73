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
from conftest import wait_until

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


def test_a_receiver_that_trickles_its_answer_is_given_up_at_the_deadline(trickling_receiver):
    """Issue 21, item 9: requests' timeout is per read, so an answer trickled a byte every
    0.2 s held the sender for good and its bounded queue dropped what came next. The whole
    request now has BUNPULSE_WEBHOOK_TIMEOUT_MS; it is retried as any failure is."""
    sender = make_sender(0, BUNPULSE_WEBHOOK_TIMEOUT_MS="1000", BUNPULSE_WEBHOOK_QUEUE_SIZE="8")
    outcomes = []
    sender.observer = lambda app, outcome, events: outcomes.append((time.monotonic(), outcome))
    app = App(id="1", key="k1", secret="s1",
              webhooks=(WebhookTarget(trickling_receiver.url),))
    try:
        sender.emit(app, occupied("first"))
        wait_until(lambda: trickling_receiver.requests, message="the first request")
        started = trickling_receiver.requests[0]["at"]
        for n in range(10):  # while the first is held: more than the queue holds
            sender.emit(app, occupied(f"later-{n}"))
            time.sleep(0.25)
        wait_until(lambda: len(trickling_receiver.events()) >= 11, timeout=10,
                   message="every event delivered")
    finally:
        sender.close()
    channels = [e["channel"] for e in trickling_receiver.events()]
    assert channels == ["first"] + [f"later-{n}" for n in range(10)]
    failed = [at - started for at, outcome in outcomes if outcome == "failed"]
    assert len(failed) == 1 and 0.9 < failed[0] < 2.0, failed
    assert "dropped" not in [outcome for _, outcome in outcomes]
