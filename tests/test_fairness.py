"""One client flooding the server as fast as it can (WebSocket pings, pusher:ping messages and
client events, pipelined) does not hold the worker: meanwhile another client's pings are
answered, new clients connect, and published events still arrive. The full-size version, with
its 50 ms target, is `scripts/bench_hostile.py`."""
import json
import os
import select
import socket
import threading
import time

import websocket

from conftest import KEY, RawClient, connected, raw_subscribe

CHANNEL = "private-flood"


def masked(payload, opcode=0x1):
    mask = os.urandom(4)
    n = len(payload)
    head = bytes((0x80 | opcode,))
    head += bytes((0x80 | n,)) if n < 126 else bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def flood(server, stop, sent):
    client = RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
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
        while not stop.is_set():
            readable, writable, _ = select.select([sock], [sock], [], 0.1)
            if readable and not sock.recv(1 << 20):
                return
            if writable:
                pending = pending or memoryview(burst)
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    continue
                sent[0] += n
                pending = pending[n:]
    except OSError:
        pass
    finally:
        sock.close()


def test_a_flooding_client_does_not_hold_the_others(server, raw, api):
    witness = raw()
    raw_subscribe(witness, connected(witness), "calm")
    witness.recv_event("pusher_internal:subscription_succeeded")
    stop, sent = threading.Event(), [0]
    flooder = threading.Thread(target=flood, args=(server, stop, sent), daemon=True)
    flooder.start()
    try:
        time.sleep(0.3)
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
    finally:
        stop.set()
        flooder.join(5)
    assert sent[0] > 1_000_000, "the flood did not get going"
    # On a quiet machine each takes a few ms; a worker held by the flood took seconds.
    assert max(rtts) < 0.5 and sorted(rtts)[len(rtts) // 2] < 0.1, rtts
    assert max(connects) < 0.5 and sorted(connects)[len(connects) // 2] < 0.1, connects
