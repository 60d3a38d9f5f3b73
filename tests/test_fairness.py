"""One client flooding the server as fast as it can (WebSocket pings, pusher:ping messages and
client events, pipelined) does not hold the worker: meanwhile another client's pings are
answered, new clients connect, and published events still arrive. The full-size version, with
its 50 ms target, is `scripts/bench_hostile.py`."""
import json
import os
import select
import threading
import time

import websocket

from conftest import KEY, RawClient, connected, pusher_api, raw_subscribe, wait_until

CHANNEL = "private-flood"


def masked(payload, opcode=0x1):
    mask = os.urandom(4)
    n = len(payload)
    head = bytes((0x80 | opcode,))
    head += bytes((0x80 | n,)) if n < 126 else bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Flood(threading.Thread):
    """One client sending pings, pusher:ping messages and client events as fast as the socket
    takes them, and reading what it is answered: `sent` and `answered` bytes so far, `ended`
    once the server closed it."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.sent, self.answered, self.ended = server, 0, 0, None
        self._halt = threading.Event()

    def run(self):
        client = RawClient(self.server.ws_url + f"/app/{KEY}?protocol=7")
        socket_id = connected(client)
        raw_subscribe(client, socket_id, CHANNEL)
        client.recv_event("pusher_internal:subscription_succeeded")
        burst = (masked(b"", 0x9) * 300
                 + masked(b'{"event":"pusher:ping","data":{}}') * 300
                 + masked(json.dumps({"event": "client-x", "channel": CHANNEL,
                                      "data": {}}).encode()) * 300)
        sock = client.ws.sock
        sock.setblocking(False)
        pending = memoryview(b"")
        try:
            while not self._halt.is_set():
                readable, writable, _ = select.select([sock], [sock], [], 0.1)
                if readable:
                    answer = sock.recv(1 << 20)
                    if not answer:
                        self.ended = "EOF"
                        return
                    self.answered += len(answer)
                if writable:
                    pending = pending or memoryview(burst)
                    try:
                        n = sock.send(pending)
                    except BlockingIOError:
                        continue
                    self.sent += n
                    pending = pending[n:]
        except OSError as exc:
            self.ended = repr(exc)
        finally:
            sock.close()

    def stop(self):
        self._halt.set()
        self.join(5)


def test_a_flooding_client_does_not_hold_the_others(start_server):
    server = start_server(env={"BUNPULSE_MAX_MESSAGES_PER_SECOND": "0"})
    api = pusher_api(server)
    witness = RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
    raw_subscribe(witness, connected(witness), "calm")
    witness.recv_event("pusher_internal:subscription_succeeded")
    flood = Flood(server)
    flood.start()
    try:
        # measured once the server is answering the flood, not while it is still idle
        wait_until(lambda: flood.answered > 256 * 1024, 10, message="the flood answered")
        sent, answered = flood.sent, flood.answered
        rtts, connects = [], []
        for n in range(20):
            start = time.monotonic()
            witness.send({"event": "pusher:ping", "data": {}})
            witness.recv_event("pusher:pong")
            rtts.append(time.monotonic() - start)
            start = time.monotonic()
            newcomer = websocket.create_connection(server.ws_url + f"/app/{KEY}?protocol=7",
                                                   timeout=5)
            assert "connection_established" in newcomer.recv()
            connects.append(time.monotonic() - start)
            newcomer.close()
            if n % 5 == 0:
                api.trigger("calm", "tick", {"n": n})
                assert json.loads(witness.recv_event("tick")["data"]) == {"n": n}
        # the flooder was still connected, sending, and being answered while the others were
        # measured (the kernel's buffers alone would have stopped taking its bytes)
        assert flood.ended is None, flood.ended
        assert flood.sent - sent > 256 * 1024 and flood.answered - answered > 256 * 1024, \
            (flood.sent - sent, flood.answered - answered)
    finally:
        flood.stop()
        witness.close()
    assert flood.ended is None, flood.ended
    # On a quiet machine each takes a few ms; a worker held by the flood took seconds.
    assert max(rtts) < 0.5 and sorted(rtts)[len(rtts) // 2] < 0.1, rtts
    assert max(connects) < 0.5 and sorted(connects)[len(connects) // 2] < 0.1, connects
