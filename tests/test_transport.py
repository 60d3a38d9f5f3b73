"""The transport's writer: non-blocking sends, a bounded buffer, and eviction of a client that
stops reading, so one slow socket never delays the others or eats memory."""
import json
import socket
import threading

import gevent
import gevent.socket
import requests
import websocket

from bunpulse.errors import ErrorCode
from bunpulse.frames import build_frame, close_frame
from bunpulse.outbox import Outbox
from conftest import (APP_ID, KEY, RawClient, WholePublisher, connected, server_frames,
                      signed_request, wait_until)


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
    # the stalled client reads again: what is left ends in a close or EOF by itself, not in
    # a hang (a timeout is a hang, and fails the test)
    stalled.ws.settimeout(5)
    try:
        for _ in range(2000):
            if isinstance(stalled.recv(), tuple):
                break
        else:
            raise AssertionError("2000 messages and no end")
    except (websocket.WebSocketConnectionClosedException, ConnectionResetError,
            BrokenPipeError):
        pass  # a reset or EOF is an end too
    wait_until(lambda: server.metric("bunpulse_evictions_total", app_id=APP_ID),
               message="an eviction")
    assert server.metric("bunpulse_evictions_total") == 1
    assert server.metric("bunpulse_connections_closed_total", app_id=APP_ID, code="4100") == 1
    assert "evicting a client that stopped reading" in server.log()
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


# ---------------------------------------------------------------- a paused client, in full size

PAUSED_BUFFER = 512 * 1024  # --max-buffer of these servers
FLOOD = 2400  # events of ~9 KB: 22 MB, far past a paused loopback socket's kernel buffers
PAD = "x" * 9000


def _rss(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class _PeakRss(threading.Thread):
    """The highest resident size of a process while it runs."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self._done = pid, _rss(pid), threading.Event()

    def run(self):
        while not self._done.wait(0.02):
            self.peak = max(self.peak, _rss(self.pid))

    def stop(self):
        self._done.set()
        self.join(5)
        return self.peak


class _Counter(threading.Thread):
    """Reads a subscriber's `flood` events as they come; they must be 0, 1, 2, ... in order."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client, self.seen, self.error = client, [], None

    def run(self):
        try:
            self.client.ws.settimeout(30)
            while len(self.seen) < FLOOD:
                message = self.client.recv()
                assert not isinstance(message, tuple), f"closed: {message}"
                if message.get("event") == "flood":
                    self.seen.append(int(message["data"][:6]))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _read_to_the_end(client):
    """Everything a paused client finds when it reads again, as fast as it can (the server
    drops an evicted socket CLOSE_LINGER seconds after its close frame was queued)."""
    sock = client.ws.sock
    sock.settimeout(10)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return server_frames(bytes(data))


def _evicted_in_full(subscribed_on, published_on, publish, channel):
    """A real paused client (normal kernel buffers, it simply stops reading) and a reading one
    on `subscribed_on`, FLOOD events published through `published_on`: the paused one is
    evicted with 4100 once --max-buffer is exceeded, the reading one gets every event in
    order, and the subscribers' server holds no more than the bound for the paused one."""
    paused, reading = (RawClient(subscribed_on.ws_url + f"/app/{KEY}?protocol=7")
                       for _ in range(2))
    try:
        for client in (paused, reading):
            connected(client)
            client.send({"event": "pusher:subscribe", "data": {"channel": channel}})
            client.recv_event("pusher_internal:subscription_succeeded")
        counter = _Counter(reading)
        counter.start()
        rss = _PeakRss(subscribed_on.proc.pid)
        rss.start()
        before = rss.peak
        evicted_at = None
        for n in range(FLOOD):
            publish(channel, "flood", f"{n:06d}{PAD}")
            if evicted_at is None and n % 50 == 0 and \
                    "evicting a client that stopped reading" in subscribed_on.log():
                evicted_at = n
                frames, rest = _read_to_the_end(paused)  # within CLOSE_LINGER of the 4100
        counter.join(30)
        grown = rss.stop() - before
        # 22 MB went to the paused client: without the bound its queue would hold most of it;
        # with it, at most its bound and the reading client's (measured: under 1 MB)
        assert grown < 2 * PAUSED_BUFFER + 3 * 1024 * 1024, f"the server grew by {grown} bytes"
        assert evicted_at is not None, "the paused client was not evicted"
        assert counter.error is None and counter.seen == list(range(FLOOD)), \
            (counter.error, len(counter.seen))
        # whole frames up to the eviction, in order, then the close frame 4100
        assert frames and frames[-1][0] == 0x8 and rest == b"", (frames[-1:], len(rest))
        assert int.from_bytes(frames[-1][1][:2], "big") == 4100
        got = [int(json.loads(payload)["data"][:6]) for opcode, payload in frames[:-1]
               if opcode == 0x1 and b'"flood"' in payload[:40]]
        assert got == list(range(len(got))) and 0 < len(got) < evicted_at
        # counted once the socket is over (the client's close frame, or CLOSE_LINGER)
        wait_until(lambda: subscribed_on.metric("bunpulse_evictions_total") == 1,
                   message="the eviction counted")
        assert subscribed_on.metric("bunpulse_connections_closed_total", app_id=APP_ID,
                                    code="4100") == 1
    finally:
        paused.close()
        reading.close()


def test_a_paused_client_of_publishes_served_in_the_event_loop_is_evicted(start_server):
    """Each publish is small and arrives whole on a keep-alive connection to BunPulse's own
    app on the local adapter, with no dashboard: the event loop's callback serves it, and
    Outbox.send runs there (no greenlet) when the paused client's queue passes the bound."""
    server = start_server(env={"BUNPULSE_MAX_BUFFER": str(PAUSED_BUFFER)}, metrics=True)
    publisher = WholePublisher(server)
    try:
        _evicted_in_full(server, server, publisher.publish, "paused-loop")
    finally:
        publisher.close()


def test_a_paused_client_of_events_relayed_through_redis_is_evicted(start_server,
                                                                    redis_server):
    """The events come from another process through a real redis-server: the subscribers'
    node sends them from the greenlet that reads Redis."""
    env = {**redis_server.env, "BUNPULSE_MAX_BUFFER": str(PAUSED_BUFFER)}
    subscribed_on = start_server(env=env, metrics=True)
    published_on = start_server(env=env)
    publisher = WholePublisher(published_on)
    try:
        _evicted_in_full(subscribed_on, published_on, publisher.publish, "paused-redis")
    finally:
        publisher.close()


def test_a_loop_served_publish_to_more_than_256_subscribers_reaches_each_in_order(
        start_server):
    """Past hub.YIELD_EVERY subscribers a fan-out yields between sockets, which the event
    loop's callback must not: a publish served there hands the fan-out to a greenlet, and the
    publishes behind it queue so that every subscriber gets them all, in order."""
    from bunpulse.hub import YIELD_EVERY
    server = start_server()
    subscribers = [RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
                   for _ in range(YIELD_EVERY + 44)]
    publisher = WholePublisher(server)
    try:
        for client in subscribers:
            connected(client)
            client.send({"event": "pusher:subscribe", "data": {"channel": "crowd"}})
        for client in subscribers:
            client.recv_event("pusher_internal:subscription_succeeded")
        for n in range(5):  # answered before its fan-out ends: the next one queues behind it
            publisher.publish("crowd", "wave", str(n))
        for client in subscribers:
            assert [client.recv_event("wave")["data"] for _ in range(5)] == \
                ["0", "1", "2", "3", "4"]
    finally:
        publisher.close()
        for client in subscribers:
            client.close()
    assert "Traceback" not in server.log()
