"""--shutdown-grace-ms under every way that has a stop: after SIGTERM and the clients' 4200, the
worker waits up to the grace for them to leave and for the webhooks their leaving causes, then
exits. A receiver that takes 3.5 s to answer the channel_vacated webhook holds the stop that long
under a 6 s grace, and not under a 0.3 s one."""
import sys
import time

import pytest

from conftest import KEY, RawClient, ServerProcess, connected, free_port
from test_hosting import WAYS

ANSWER_S = 3.5  # past the 2.3 s gunicorn's stock worker takes to exit by itself
GRACE_WAYS = {
    "python -m bunpulse": ([sys.executable, "-m", "bunpulse"], lambda port: []),
    "gunicorn -c gunicorn.conf.py": ([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
                                     lambda port: []),
    **{name: WAYS[name][:2] for name in ("own worker", "stock worker", "flask run")},
}


@pytest.mark.parametrize("grace_ms", [6000, 300])
@pytest.mark.parametrize("way", list(GRACE_WAYS))
def test_the_stop_waits_for_webhooks_within_the_grace(way, grace_ms, webhook_receiver):
    command, args = GRACE_WAYS[way]
    port = free_port()
    server = ServerProcess(command=command, args=args(port), port=port, env={
        "BUNPULSE_SHUTDOWN_GRACE_MS": str(grace_ms), "BUNPULSE_WEBHOOK_URL": webhook_receiver.url,
        "BUNPULSE_WEBHOOK_BATCH_MS": "0", "BUNPULSE_WEBHOOK_DELAY_MS": "0",
        "BUNPULSE_WEBHOOK_TIMEOUT_MS": "10000", "FLASK_SKIP_DOTENV": "1"})
    client = RawClient(f"{server.ws_url}/app/{KEY}?protocol=7&client=py&version=1")
    try:
        connected(client)
        client.send({"event": "pusher:subscribe", "data": {"channel": "grace"}})
        client.recv_event("pusher_internal:subscription_succeeded")
        webhook_receiver.wait_events("channel_occupied")
        webhook_receiver.delay = ANSWER_S  # the vacated one is answered late
        started = time.monotonic()
        server.signal(15)
        assert client.recv_close()[0] == 4200
        server.proc.wait(20)
        took = time.monotonic() - started
        assert webhook_receiver.wait_events("channel_vacated"), "the webhook was not sent"
        if grace_ms > ANSWER_S * 1000:
            assert ANSWER_S <= took < grace_ms / 1000 + 2, f"{way} stopped in {took:.2f} s"
        else:
            assert took < ANSWER_S - 0.3, f"{way} stopped in {took:.2f} s"
    finally:
        client.close()
        server.stop()
