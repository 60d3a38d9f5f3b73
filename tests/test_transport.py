"""The transport's writer: non-blocking sends, a bounded buffer, and eviction of a client that
stops reading, so one slow socket never delays the others or eats memory."""
import json
import socket

import gevent
import gevent.socket
import requests

from bunpulse.errors import ErrorCode
from bunpulse.frames import build_frame, close_frame
from bunpulse.outbox import Outbox
from conftest import APP_ID, connected, signed_request, wait_until


def _pair():
    """Two ends of a TCP connection on loopback, with small buffers (TCP, unlike a unix
    socketpair, takes part of a frame when its buffer is nearly full)."""
    with gevent.socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        right = gevent.socket.socket()
        right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        right.connect(listener.getsockname())
        left, _ = listener.accept()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return left, right


def test_outbox_keeps_order_and_coalesces_a_backlog():
    left, right = _pair()
    outbox = Outbox(left, limit=1 << 20)
    frames = [build_frame(json.dumps({"n": n, "pad": "x" * 2000}).encode()) for n in range(200)]
    for frame in frames:  # far more than the socket buffers hold: most of it queues
        outbox.send(frame)
    assert outbox.backlog > 0
    expected = b"".join(frames)
    received = bytearray()
    with gevent.Timeout(10):
        while len(received) < len(expected):
            received += right.recv(65536)
    assert bytes(received) == expected
    assert outbox.backlog == 0 and not outbox.closed


def test_outbox_evicts_a_reader_that_stopped_past_the_bound():
    """Past the bound the queue is dropped but for the end of the frame the socket took the
    start of, and a close frame 4100 follows it: a client that reads again gets whole frames,
    then the code (pusher-js backs off on it), and the server keeps at most one frame."""
    left, right = _pair()
    evicted = []
    outbox = Outbox(left, limit=64 * 1024, on_evict=lambda: evicted.append(True))
    frame = build_frame(b"y" * 8000)
    for _ in range(100):  # 800 KB to a peer that never reads
        outbox.send(frame)
        if outbox.closed:
            break
    assert evicted == [True] and outbox.closed
    closing = close_frame(ErrorCode.OVER_CAPACITY, "Client too slow")
    assert outbox.backlog <= len(frame) + len(closing)  # the queued frames were dropped
    outbox.send(frame)  # sending to an evicted client is a no-op
    assert outbox.backlog <= len(frame) + len(closing)
    received = bytearray()
    with gevent.Timeout(5):  # the peer reads on: whole frames, the close, then the end
        while True:
            data = right.recv(65536)
            if not data:
                break
            received += data
    assert received.endswith(closing)
    frames = bytes(received[:-len(closing)])
    assert len(frames) % len(frame) == 0 and frames == frame * (len(frames) // len(frame))


def test_close_frame_carries_the_code_and_a_bounded_reason():
    frame = close_frame(ErrorCode.OVER_CAPACITY, "r" * 300)
    assert frame[0] == 0x88 and frame[1] == 125  # a control frame holds 125 bytes at most
    assert int.from_bytes(frame[2:4], "big") == 4100


def _publish_batch(server, channel, payload, count):
    path = f"/apps/{APP_ID}/batch_events"
    body = json.dumps({"batch": [{"name": "big", "channel": channel, "data": payload}
                                 for _ in range(count)]}).encode()
    response = signed_request(server, "POST", path, body, timeout=10)
    assert response.status_code == 200, response.text


def test_a_client_that_stops_reading_is_evicted_and_others_keep_up(start_server, raw):
    server = start_server(env={"BUNPULSE_MAX_BUFFER": "65536"}, metrics=True)
    stalled = raw(target=server, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    connected(stalled)
    stalled.send({"event": "pusher:subscribe", "data": {"channel": "firehose"}})
    stalled.recv_event("pusher_internal:subscription_succeeded")
    reader = raw(target=server)
    connected(reader)
    reader.send({"event": "pusher:subscribe", "data": {"channel": "firehose"}})
    reader.recv_event("pusher_internal:subscription_succeeded")

    payload = "z" * 9000
    received = 0
    for _ in range(80):  # 800 events of 9 KB: far past what loopback buffers absorb
        _publish_batch(server, "firehose", payload, 10)
        while True:  # the healthy reader drains as it goes and is never held back
            message = reader.recv()
            assert message["event"] == "big"
            received += 1
            if received % 10 == 0:
                break
    assert received == 800
    wait_until(lambda: server.metric("bunpulse_evictions_total", app_id=APP_ID),
               message="an eviction")
    assert server.metric("bunpulse_evictions_total") == 1
    assert server.metric("bunpulse_connections_closed_total", app_id=APP_ID, code="4100") == 1
    assert "evicting a client that stopped reading" in server.log()
    # the evicted socket is gone: reading what is left ends in a close or EOF, not a hang
    stalled.ws.settimeout(5)
    ended = False
    try:
        for _ in range(2000):
            if isinstance(stalled.recv(), tuple):
                ended = True
                break
    except Exception:  # noqa: BLE001 - a reset or EOF is an end too
        ended = True
    assert ended
    info = requests.get(server.url + "/health")
    assert info.status_code == 200


class _CountingSocket:
    """A real socket whose writes are counted."""

    def __init__(self, sock):
        self._inner, self.writes = sock, 0

    def fileno(self):
        return self._inner.fileno()

    def send(self, data):
        self.writes += 1
        return self._inner.send(data)


def test_frames_the_event_loop_sends_in_one_turn_leave_in_one_write():
    left, right = gevent.socket.socketpair()
    counting = _CountingSocket(left._sock)
    outbox = Outbox(counting, limit=1 << 20)
    frames = [build_frame(b'{"n":%d}' % n) for n in range(3)]
    seen = []

    def in_the_loop():  # e.g. three publishes served in one turn, to one subscriber
        for frame in frames:
            outbox.send(frame)
        seen.append((counting.writes, outbox.backlog))

    gevent.get_hub().loop.run_callback(in_the_loop)
    gevent.sleep(0.05)  # the turn ends
    assert seen == [(0, sum(map(len, frames)))]
    assert counting.writes == 1 and outbox.backlog == 0
    with gevent.Timeout(5):
        assert right.recv(65536) == b"".join(frames)
    outbox.send(frames[0])  # from a greenlet (a big fan-out, Redis): written at once
    assert counting.writes == 2 and outbox.backlog == 0
