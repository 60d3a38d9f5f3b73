"""Memory comes back: once a client with many subscriptions, or with a long outbox backlog,
has left, no object of it stays. The server runs in this process (start_bunpulse) so that gc
and tracemalloc can look at it."""
import gc
import json
import os
import socket
import threading
import tracemalloc
import weakref

import pytest

from bunpulse import start_bunpulse
from bunpulse.websocket import PusherWebSocket
from conftest import APP_ID, KEY, SECRET, RawClient, bunpulse_bytes, connected, wait_until

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

CHANNELS = 1500
NAME = "mem-{}-" + "x" * 120  # long names, as an attacker would choose


def websockets():
    return {id(o) for o in gc.get_objects() if isinstance(o, PusherWebSocket)}


def test_a_big_client_and_a_slow_one_leave_nothing_behind():
    server = start_bunpulse(port=0, host="127.0.0.1", app_id=APP_ID, app_key=KEY,
                            app_secret=SECRET, env_file=os.devnull)
    url = f"ws://127.0.0.1:{server.port}/app/{KEY}?protocol=7"
    seen, lock = [], threading.Lock()

    def remember(conn, _data):  # runs in the server's thread
        with lock:
            seen.append((weakref.ref(conn), weakref.ref(conn.outbox)))

    server.on("connection", remember)
    try:
        warm_up = RawClient(url)  # first-use allocations (imports, caches) are not a leak
        connected(warm_up)
        warm_up.send({"event": "pusher:subscribe", "data": {"channel": "warm"}})
        warm_up.recv_event("pusher_internal:subscription_succeeded")
        warm_up.close()
        wait_until(lambda: not server.core.hub.connections(), message="warm-up gone")
        seen.clear()
        gc.collect()
        sockets_before = websockets()  # other tests' servers may have left some in this process
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()

        big = RawClient(url)
        connected(big)
        for start in range(0, CHANNELS, 500):
            for n in range(start, start + 500):
                big.send({"event": "pusher:subscribe", "data": {"channel": NAME.format(n)}})
            for _ in range(500):
                big.recv_event("pusher_internal:subscription_succeeded")

        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", server.port))
        slow_client = RawClient(url, socket=slow)
        connected(slow_client)
        slow_client.send({"event": "pusher:subscribe", "data": {"channel": "mem-slow"}})
        slow_client.recv_event("pusher_internal:subscription_succeeded")
        wait_until(lambda: len(seen) == 2, message="both connections seen")
        slow_outbox = seen[1][1]
        blob = json.dumps({"blob": "y" * 8000})
        # The slow client stops reading: its outbox grows (below the eviction limit).
        while slow_outbox().backlog < 200_000:
            server.publish("mem-slow", {"event": "fill", "data": blob})

        held = bunpulse_bytes(tracemalloc.take_snapshot(), before)
        assert held > 1_000_000, held  # what both clients hold is seen (the test can fail)

        big.close()
        slow.shutdown(socket.SHUT_RDWR)  # gone without reading its backlog
        slow.close()
        wait_until(lambda: not server.core.hub.connections(), message="both gone")
        wait_until(lambda: gc.collect() is not None and all(
            ref() is None for refs in seen for ref in refs), message="their objects freed")
        state = server.core.hub.app(APP_ID)
        assert not state.channels and not state.connections
        assert websockets() == sockets_before
        assert not server.core.adapter.subscription_count(APP_ID, NAME.format(0))
        after = tracemalloc.take_snapshot()
        left = bunpulse_bytes(after, before)
        # What may stay: the hub's channel table keeps its peak size until its next resize
        # (a dict does not shrink on deletion), a few bytes per channel the client held.
        assert left < 64 * 1024, (left, [str(s) for s in after.compare_to(before, "lineno")[:8]])
        assert left < held / 20
    finally:
        tracemalloc.stop()
        server.stop()
