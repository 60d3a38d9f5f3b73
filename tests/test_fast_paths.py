"""The two places a request is served give the same answers: a request that arrives in a few
reads is served by the event loop's callback (serving/loop.py); one that arrives in many pieces
is handed, with the one reader (request.py), to a greenlet (serving/handler.py). Each request
below is sent both ways and the answers compared: for an upgrade the status line, the messages
and the close code that follow; for a publish the whole answer but its Date."""
import base64
import json
import os
import socket
import struct
import threading
import time

import pytest

from conftest import (APP_ID, KEY, SECRET, RawClient, connected, publish_request,
                      raw_subscribe)

FOLD = b"X-Folded: a\r\n b\r\n"
PIECES = 12  # more reads than the event loop gathers (loop.MAX_PIECES): the greenlet's then


def send(sock, data, slow=False):
    """Send `data` at once, or (slow) in PIECES pieces a little apart."""
    if not slow:
        sock.sendall(data)
        return
    step = max(1, -(-len(data) // PIECES))
    for at in range(0, len(data), step):
        sock.sendall(data[at:at + step])
        time.sleep(0.01)


def _key():
    return base64.b64encode(os.urandom(16)).decode()


def head(path=f"/app/{KEY}?protocol=7", version="13", key=None, http="HTTP/1.1",
         extra=""):
    key = _key() if key is None else key
    return (f"GET {path} {http}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\n{extra}").encode()


REQUESTS = {
    "good": head(),
    "good with a subscribe behind the head": head(),
    "unknown key": head(path="/app/nope?protocol=7"),
    "no protocol": head(path=f"/app/{KEY}"),
    "old protocol": head(path=f"/app/{KEY}?protocol=3"),
    "wrong path": head(path="/socket?protocol=7"),
    "percent-encoded key": head(path=f"/app/%{ord(KEY[0]):02X}{KEY[1:]}?protocol=7"),
    "bad version": head(version="99"),
    "bad key": head(key="short"),
    "HTTP/1.0": head(http="HTTP/1.0"),
}
SUBSCRIBE = json.dumps({"event": "pusher:subscribe", "data": {"channel": "paths"}}).encode()


def masked(payload):
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def exchange(server, request, behind=b"", slow=False):
    """What the server answers: (status line, [messages], close code or None)."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    try:
        send(sock, request + b"\r\n", slow)
        sock.sendall(behind)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        status, _, rest = data.partition(b"\r\n")
        if not status.startswith(b"HTTP/1.1 101"):
            return status, [], None
        body = rest.partition(b"\r\n\r\n")[2]
        messages, close = [], None
        want = 2 if behind else 1
        while close is None and len(messages) < want:
            while True:
                if len(body) >= 2 and len(body) >= 2 + (body[1] & 0x7F) + (
                        2 if body[1] & 0x7F == 126 else 0):
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    return status, messages, "eof"
                body += chunk
            n, at = body[1] & 0x7F, 2
            if n == 126:
                n, at = struct.unpack("!H", body[2:4])[0], 4
            opcode, payload, body = body[0] & 0x0F, body[at:at + n], body[at + n:]
            if opcode == 0x8:
                close = struct.unpack("!H", payload[:2])[0]
            else:
                message = json.loads(payload)
                if message.get("event") == "pusher:connection_established":
                    message["data"] = sorted(json.loads(message["data"]))  # ids differ
                messages.append(message)
        return status, messages, close
    finally:
        sock.close()


@pytest.mark.parametrize("name", REQUESTS)
def test_both_paths_answer_alike(server, name):
    behind = masked(SUBSCRIBE) if "subscribe" in name else b""
    fast = exchange(server, REQUESTS[name], behind)
    slow = exchange(server, REQUESTS[name], behind, slow=True)
    assert fast == slow
    if name.startswith("good") or name == "percent-encoded key":
        assert fast[0].startswith(b"HTTP/1.1 101") and fast[2] is None
        assert fast[1][0]["event"] == "pusher:connection_established"
    if behind:
        assert fast[1][1]["event"] == "pusher_internal:subscription_succeeded"


@pytest.mark.parametrize("slow", [False, True])
def test_a_folded_header_line_is_refused_on_both_paths(server, slow):
    """Obsolete line folding is refused (400), as RFC 9112 allows: one reader, one answer."""
    status, _, _ = exchange(server, REQUESTS["good"] + FOLD, slow=slow)
    assert status == b"HTTP/1.1 400 Bad Request"


# ---------------------------------------------------------------- publishes

def answers(server, requests_, slow=False):
    """The answers to requests sent one after the other on one keep-alive connection."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    out = []
    data = b""
    try:
        for head, body in requests_:
            send(sock, head + b"\r\n" + body, slow)
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            top, _, data = data.partition(b"\r\n\r\n")
            lines = top.split(b"\r\n")
            headers = dict(line.split(b": ", 1) for line in lines[1:])
            length = int(headers[b"Content-Length"])
            while len(data) < length:
                data += sock.recv(65536)
            payload, data = data[:length], data[length:]
            headers.pop(b"Date")
            out.append((lines[0], sorted(headers.items()), json.loads(payload)))
    finally:
        sock.close()
    return out


def event(**extra):
    return {"name": "paths", "channels": ["paths-http"], "data": "{}", **extra}


EVENTS, BATCH = f"/apps/{APP_ID}/events", f"/apps/{APP_ID}/batch_events"
PUBLISHES = [
    (EVENTS, event(), {}),
    (EVENTS, event(info="subscription_count"), {}),
    (EVENTS, event(), {"secret": "wrong"}),
    (EVENTS, b"{not json", {}),
    (EVENTS, event(channels=["bad name"]), {}),
    (EVENTS, event(data="x" * 10241), {}),
    ("/apps/999/events", event(), {}),
    (BATCH, {"batch": [{"name": "e", "channel": "a", "data": "x"}] * 11}, {}),
    (BATCH, {"batch": [{"name": "e", "channel": "paths-http", "data": "x"}] * 3}, {}),
]


def test_publishes_answer_alike_and_keep_the_connection(server):
    listener = RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
    raw_subscribe(listener, connected(listener), "paths-http")
    listener.recv_event("pusher_internal:subscription_succeeded")
    fast = answers(server, [publish_request(p, b, **kw) for p, b, kw in PUBLISHES])
    slow = answers(server, [publish_request(p, b, **kw) for p, b, kw in PUBLISHES], slow=True)
    assert fast == slow
    assert [status.split()[1] for status, _, _ in fast] == [
        b"200", b"200", b"401", b"400", b"400", b"413", b"404", b"400", b"200"]
    received = 0
    while received < 2 * (2 + 3):  # both ways: two single events and a batch of three
        if listener.recv().get("event") in ("paths", "e"):
            received += 1
    listener.close()


def test_headers_reach_the_application_either_way(server):
    body = json.dumps(event()).encode()
    for token, status in ((SECRET, b"200"), ("wrong", b"401")):
        head = (f"POST {EVENTS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode()
        fast, slow = answers(server, [(head, body)]), answers(server, [(head, body)], slow=True)
        assert fast == slow and fast[0][0].split()[1] == status


def test_a_publish_then_another_route_on_one_connection(server):
    """The event loop hands a keep-alive connection over to a greenlet mid-way."""
    head, body = publish_request(EVENTS, event())
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.sendall(head + b"\r\n" + body + b"GET /health HTTP/1.1\r\nHost: x\r\n"
                 b"Connection: close\r\n\r\n")
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    assert data.count(b"HTTP/1.1 200") == 2, data


def test_another_post_whose_body_comes_late_reaches_the_application_whole(server):
    """A POST that is not a publish, its body sent after its head: the loop reads the body,
    finds the route is not a publish and hands the request to a greenlet, whole."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.sendall(f"POST /apps/{APP_ID}/users/u/terminate_connections HTTP/1.1\r\nHost: x\r\n"
                 "Content-Type: application/json\r\nContent-Length: 2\r\n"
                 "Connection: close\r\n\r\n".encode())
    time.sleep(0.3)
    sock.sendall(b"{}")
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer  # unsigned: refused, but answered


def test_pipelined_publishes_whose_answers_overflow_the_socket_are_all_answered(server):
    """Served in the event loop, a keep-alive connection's pipelined publishes are answered
    while the answers fit the socket; once a client that is not reading fills it (past the
    4 MB a loopback socket's buffer may grow to), the rest is written by a greenlet as the
    client reads: every answer arrives, whole and in order."""
    count = 300  # each answer lists 100 long channel names: about 17 KB, 5 MB in all
    requests_ = []
    for n in range(count):
        channels = [f"overflow-{n}-{c}-".ljust(150, "x") for c in range(100)]
        requests_.append((channels, publish_request(EVENTS, event(
            channels=channels, info="subscription_count", data=str(n)))))
    sock = socket.create_connection((server.host, server.port), timeout=20)
    sender = threading.Thread(target=sock.sendall, args=(b"".join(
        head + b"\r\n" + body for _, (head, body) in requests_),))
    try:
        sender.start()
        time.sleep(1)  # not reading: the server fills the socket meanwhile
        data = b""
        answered = []
        while len(answered) < count:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {len(answered)} answers"
            data += chunk
            while b"\r\n\r\n" in data:
                top, _, rest = data.partition(b"\r\n\r\n")
                length = int(dict(line.split(b": ", 1) for line in top.split(b"\r\n")[1:])[
                    b"Content-Length"])
                if len(rest) < length:
                    break
                answered.append((top.split()[1], json.loads(rest[:length])))
                data = rest[length:]
        sender.join(10)
    finally:
        sock.close()
    for (status, body), (channels, _) in zip(answered, requests_):
        assert status == b"200" and list(body["channels"]) == channels
