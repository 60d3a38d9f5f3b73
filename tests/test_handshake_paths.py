"""The two ways a handshake is served give the same answers: a well-formed upgrade is read with
httptools and served without pywsgi's request machinery; anything else (here forced by a
folded header line, which httptools refuses) goes through pywsgi as before. Each request below
is sent both ways and the answers compared: the HTTP status line, and for an upgrade the
messages and the close code that follow."""
import base64
import json
import os
import socket
import struct

import pytest

from conftest import KEY

FOLD = b"X-Folded: a\r\n b\r\n"


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


def exchange(server, request, behind=b""):
    """What the server answers: (status line, [messages], close code or None)."""
    sock = socket.create_connection((server.host, server.port), timeout=5)
    try:
        sock.sendall(request + b"\r\n" + behind)
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
    slow = exchange(server, REQUESTS[name] + FOLD, behind)
    assert fast == slow
    if name.startswith("good") or name == "percent-encoded key":
        assert fast[0].startswith(b"HTTP/1.1 101") and fast[2] is None
        assert fast[1][0]["event"] == "pusher:connection_established"
    if behind:
        assert fast[1][1]["event"] == "pusher_internal:subscription_succeeded"
