"""permessage-deflate (RFC 7692), negotiated with clients that offer it: events leave deflated,
compressed once for every socket (no context takeover on either side); client messages are
inflated, at most to the message size limit (a zip bomb gets 1009); `--compression false` turns
it off. These tests speak with hand-made frames: pusher-js under Node offers no extension (its
bundled faye-websocket client registers none), so the other suites' pusher-js clients run
uncompressed. pusher-js with compression, in a browser that negotiates it, and `--max-buffer`
counting deflated bytes: test_compression_browser.py."""
import base64
import json
import os
import socket
import struct
import time
import zlib

import pytest

from bunpulse.frames import (OP_PING, OP_TEXT, FrameParser, Violation, build_frame,
                             deflated)
from conftest import KEY, ServerProcess, pusher_api

OFFER = "permessage-deflate; client_max_window_bits"
EVENT = json.dumps({"items": [{"id": n, "name": f"item {n}", "tags": ["a", "b"]}
                              for n in range(20)]})  # about 1 KB of JSON


def compress(payload):
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def client_frame(payload, compressed=False, opcode=OP_TEXT):
    """A masked client frame (RSV1 set when compressed)."""
    first = (0xC0 if compressed else 0x80) | opcode
    n = len(payload)
    head = bytes((first, 0x80 | n)) if n < 126 else bytes((first, 0xFE)) + struct.pack("!H", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def inflate(payload):
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


# ---------------------------------------------------------------- without a socket

def test_deflated_frames_inflate_back_and_are_built_once():
    plain = build_frame(EVENT.encode()) + build_frame(b"tiny") + build_frame(b"", OP_PING)
    out = deflated(plain)
    assert deflated(plain) is out  # the same object for every socket of a fan-out
    first = out[0]
    assert first & 0x40 and first & 0x0F == OP_TEXT
    length, at = out[1] & 0x7F, 2
    if length == 126:
        length, at = struct.unpack("!H", out[2:4])[0], 4
    assert inflate(out[at:at + length]) == EVENT.encode()
    assert out[at + length:] == build_frame(b"tiny") + build_frame(b"", OP_PING)
    assert len(out) < len(plain) / 3


def test_the_parser_inflates_only_when_negotiated():
    frame = client_frame(compress(EVENT.encode()), compressed=True)
    parser = FrameParser(inflate=True)
    parser.receive_data(frame[:7])
    parser.receive_data(frame[7:])
    assert parser.events_received() == [EVENT]
    parser = FrameParser(inflate=False)
    parser.receive_data(frame)
    (event,) = parser.events_received()
    assert isinstance(event, Violation) and event.code == 1002


def test_a_zip_bomb_is_refused_at_the_inflated_size():
    bomb = compress(b" " * (10 << 20))  # 10 MB of spaces in about 10 KB
    assert len(bomb) < 65536
    parser = FrameParser(max_message_size=65536, inflate=True)
    parser.receive_data(client_frame(bomb, compressed=True))
    (event,) = parser.events_received()
    assert isinstance(event, Violation) and event.code == 1009


# ---------------------------------------------------------------- against the server

def handshake(server, offer=OFFER, slow=False):
    sock = socket.create_connection((server.host, server.port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    extra = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
    request = (f"GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Key: {key}\r\n{extra}\r\n").encode()
    # slow: in more pieces than the event loop gathers, so a greenlet answers it
    for at in range(0, len(request), 16 if slow else len(request)):
        sock.sendall(request[at:at + (16 if slow else len(request))])
        if slow:
            time.sleep(0.003)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    return sock, head.decode(), [rest]


def frames(sock, buffer):
    """Yield (rsv1, opcode, payload) of the server's frames."""
    data = buffer[0]
    while True:
        while len(data) >= 2:
            n, at = data[1] & 0x7F, 2
            if n == 126:
                if len(data) < 4:
                    break
                n, at = struct.unpack("!H", data[2:4])[0], 4
            if len(data) < at + n:
                break
            yield bool(data[0] & 0x40), data[0] & 0x0F, data[at:at + n]
            data = data[at + n:]
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk


def message(rsv1, payload):
    return json.loads(inflate(payload) if rsv1 else payload)


@pytest.mark.parametrize("slow", [False, True], ids=["event loop", "greenlet"])
def test_negotiated_events_arrive_deflated_and_messages_are_inflated(server, slow):
    sock, head, buffer = handshake(server, slow=slow)
    assert "permessage-deflate; server_no_context_takeover; client_no_context_takeover" in head
    reader = frames(sock, buffer)
    established = message(*next(reader)[::2])
    assert established["event"] == "pusher:connection_established"
    subscribe = json.dumps({"event": "pusher:subscribe", "data": {"channel": "zipped"}})
    sock.sendall(client_frame(compress(subscribe.encode()), compressed=True))
    rsv1, _, payload = next(reader)
    assert message(rsv1, payload)["event"] == "pusher_internal:subscription_succeeded"
    pusher_api(server).trigger("zipped", "big", json.loads(EVENT))
    rsv1, opcode, payload = next(reader)
    assert rsv1 and opcode == OP_TEXT and len(payload) < len(EVENT) / 2
    event = message(rsv1, payload)
    assert event["event"] == "big" and json.loads(event["data"]) == json.loads(EVENT)
    sock.sendall(client_frame(compress(b" " * (1 << 20)), compressed=True))  # a zip bomb
    for rsv1, opcode, payload in reader:
        if opcode == 0x8:
            assert struct.unpack("!H", payload[:2])[0] == 1009
            break
    else:
        pytest.fail("no close frame")
    sock.close()


@pytest.mark.parametrize("offer", [None, "x-webkit-deflate-frame",
                                   "permessage-deflate; server_max_window_bits=10"])
def test_no_compression_unless_offered_as_we_can_serve_it(server, offer):
    sock, head, _ = handshake(server, offer)
    assert "Sec-WebSocket-Extensions" not in head
    sock.close()


def test_compression_can_be_turned_off():
    process = ServerProcess(env={"BUNPULSE_COMPRESSION": "false"})
    try:
        sock, head, _ = handshake(process)
        assert head.startswith("HTTP/1.1 101") and "Sec-WebSocket-Extensions" not in head
        sock.close()
    finally:
        process.stop()
