"""One Pusher connection at the frame level: the handshake, refusals with their close codes,
ping/pong and the server heartbeat, malformed and oversized frames, fragmentation, close
frames, and serving on a unix socket."""
import json
import re
import struct
import time

import pytest
import websocket

from conftest import (KEY, RawClient, assert_alive, connected, raw_subscribe, unix_request,
                      unix_socket)

SOCKET_ID = re.compile(r"^\d+\.\d+$")
PATH = f"/app/{KEY}?protocol=7&client=py&version=1.0"


def refusal(client):
    """(pusher:error data, close code) of a refused connection."""
    first = client.recv()
    assert isinstance(first, dict) and first["event"] == "pusher:error", first
    code, _reason = client.recv_close()
    return first["data"], code


@pytest.fixture
def witness(raw, api):
    """A second client on a public channel: check(n) proves it still gets published events."""
    client = raw()
    socket_id = connected(client)
    raw_subscribe(client, socket_id, "witness")
    client.recv_event("pusher_internal:subscription_succeeded")
    count = iter(range(1000))

    def check():
        n = next(count)
        api.trigger("witness", "tick", {"n": n})
        event = client.recv_event("tick")
        assert json.loads(event["data"]) == {"n": n}
    return check


# ---------------------------------------------------------------- handshake

def test_connection_established(raw, server):
    client = raw()
    message = client.recv()
    assert message["event"] == "pusher:connection_established"
    assert set(message) == {"event", "data"}
    assert isinstance(message["data"], str)  # double encoded
    data = json.loads(message["data"])
    assert set(data) == {"socket_id", "activity_timeout"}
    assert SOCKET_ID.match(data["socket_id"])
    assert isinstance(data["activity_timeout"], int) and 0 < data["activity_timeout"] <= 120
    # Clients ping before the server gives up on them (default timeout: 60 s).
    assert data["activity_timeout"] * 1000 < 60000


def test_socket_ids_are_unique(raw):
    ids = [connected(raw()) for _ in range(20)]
    assert len(set(ids)) == len(ids)
    assert all(SOCKET_ID.match(i) for i in ids)


@pytest.mark.parametrize("path", [
    PATH, f"/app/{KEY}/?protocol=7", f"/app/{KEY}?protocol=5", f"/app/{KEY}?protocol=6",
    f"/app/{KEY}?protocol=7&client=js&version=8.6.0&flash=false&unknown=1",
])
def test_accepted_urls(raw, path):
    assert SOCKET_ID.match(connected(raw(path)))


@pytest.mark.parametrize("path, code", [
    ("/app/no-such-key?protocol=7", 4001),
    ("/foo?protocol=7", 4005),
    ("/?protocol=7", 4005),
    ("/app?protocol=7", 4005),
    (f"/app/{KEY}/extra?protocol=7", 4005),
    (f"/apps/{KEY}?protocol=7", 4005),
    (f"/app/{KEY}", 4008),
    (f"/app/{KEY}?protocol=", 4008),
    (f"/app/{KEY}?client=js", 4008),
    (f"/app/{KEY}?protocol=4", 4007),
    (f"/app/{KEY}?protocol=8", 4007),
    (f"/app/{KEY}?protocol=seven", 4007),
])
def test_refused_connections(raw, path, code):
    data, close_code = refusal(raw(path))
    assert data["code"] == code
    assert close_code == code
    assert isinstance(data["message"], str) and data["message"]


def test_unknown_key_message(raw):
    data, _ = refusal(raw("/app/no-such-key?protocol=7"))
    assert data == {"code": 4001, "message": "App key no-such-key does not exist."}


# ---------------------------------------------------------------- ping and heartbeat

def test_ping_pong(raw):
    client = raw()
    connected(client)
    assert_alive(client)
    client.send('{"event":"pusher:ping","data":"{}"}')  # double-encoded data is fine too
    assert client.recv_event("pusher:pong")["data"] == "{}"
    client.send({"event": "pusher:pong", "data": {}})   # a pong needs no answer
    assert_alive(client)


HEARTBEAT = {"BUNPULSE_HEARTBEAT_INTERVAL": "300", "BUNPULSE_HEARTBEAT_TIMEOUT": "900"}


@pytest.fixture
def fast_heartbeat(start_server):
    return start_server(env=HEARTBEAT)


def test_silent_client_is_pinged_then_closed_with_4201(raw, fast_heartbeat):
    client = raw(target=fast_heartbeat)
    start = time.monotonic()
    connected(client)
    assert client.recv() == {"event": "pusher:ping", "data": "{}"}
    pinged = time.monotonic() - start
    code, _ = client.recv_close()
    closed = time.monotonic() - start
    assert code == 4201
    assert 0.25 <= pinged < 0.8, pinged
    assert 0.85 <= closed < 2.5, closed


def test_client_that_answers_pings_stays_connected(raw, fast_heartbeat):
    client = raw(target=fast_heartbeat)
    connected(client)
    pings = 0
    deadline = time.monotonic() + 2.0  # more than twice the 0.9 s timeout
    while time.monotonic() < deadline:
        message = client.recv()
        assert not isinstance(message, tuple), f"closed: {message}"
        assert message["event"] == "pusher:ping"
        pings += 1
        client.send({"event": "pusher:pong", "data": {}})
    assert pings >= 3
    assert_alive(client)


def test_activity_timeout_is_below_the_heartbeat_timeout(raw, fast_heartbeat):
    client = raw(target=fast_heartbeat)
    message = client.recv_event("pusher:connection_established")
    activity_timeout = json.loads(message["data"])["activity_timeout"]
    assert 0 < activity_timeout * 1000 <= 300 < 900


# ---------------------------------------------------------------- malformed frames

@pytest.mark.parametrize("frame", [
    "not json",
    "",
    "[1,2]",
    '"pusher:ping"',
    '{"data":{}}',
    '{"event":5,"data":{}}',
    '{"event":["pusher:ping"]}',
    '{"event":"pusher:subscribe","data":{}}',
    '{"event":"pusher:subscribe","data":{"channel":5}}',
    '{"event":"pusher:subscribe"}',
    '{"event":"pusher:unsubscribe","data":{}}',
    '{"event":"pusher:no-such-event","data":{}}',
])
def test_malformed_frames_get_pusher_error(raw, witness, frame):
    client = raw()
    connected(client)
    client.send(frame)
    error = client.recv_event("pusher:error")
    assert isinstance(error["data"]["message"], str) and error["data"]["message"]
    witness()
    assert_alive(client)


def test_binary_frame_gets_pusher_error(raw, witness):
    client = raw()
    connected(client)
    client.ws.send_binary(b'{"event":"pusher:ping","data":{}}')
    error = client.recv_event("pusher:error")
    assert "Binary" in error["data"]["message"]
    witness()
    assert_alive(client)


def test_invalid_utf8_closes_with_1007(raw, witness):
    client = raw()
    connected(client)
    client.ws.send(b'{"event":"pusher:ping","data":"\xff\xfe"}', websocket.ABNF.OPCODE_TEXT)
    code, _ = client.recv_close()
    assert code == 1007
    witness()


def padded_ping(size):
    """A valid pusher:ping message of exactly `size` bytes."""
    frame = '{"event":"pusher:ping","data":{"pad":""}}'
    return frame.replace('""', '"' + "x" * (size - len(frame)) + '"')


def test_message_at_the_size_limit_is_served(raw):
    client = raw()
    connected(client)
    client.send(padded_ping(65536))  # BUNPULSE_MAX_MESSAGE_SIZE defaults to 65536
    assert client.recv_event("pusher:pong")


def test_message_over_the_size_limit_closes_with_1009(raw, witness):
    client = raw()
    connected(client)
    client.send(padded_ping(65537))
    code, _ = client.recv_close()
    assert code == 1009
    witness()


def test_oversized_header_is_refused_before_the_payload(raw, witness):
    client = raw()
    connected(client)
    # A masked text frame header claiming 100 MB, and nothing else: the close must come anyway.
    client.ws.sock.sendall(b"\x81" + bytes((0x80 | 127,)) + struct.pack("!Q", 100 * 1024 ** 2))
    start = time.monotonic()
    code, _ = client.recv_close()
    assert code == 1009
    assert time.monotonic() - start < 2
    witness()


def test_configured_message_size(raw, start_server):
    server = start_server(env={"BUNPULSE_MAX_MESSAGE_SIZE": "2048"})
    client = raw(target=server)
    connected(client)
    client.send(padded_ping(2048))
    assert client.recv_event("pusher:pong")
    client.send(padded_ping(2049))
    assert client.recv_close()[0] == 1009


# ---------------------------------------------------------------- fragmentation and close

def send_fragments(client, text, parts, ping_between=False):
    data = text.encode()
    step = -(-len(data) // parts)
    chunks = [data[i:i + step] for i in range(0, len(data), step)]
    for n, chunk in enumerate(chunks):
        opcode = websocket.ABNF.OPCODE_TEXT if n == 0 else websocket.ABNF.OPCODE_CONT
        client.ws.send_frame(websocket.ABNF.create_frame(chunk, opcode,
                                                         fin=int(n == len(chunks) - 1)))
        if ping_between and n == 0:
            client.ws.ping(b"between")


def test_fragmented_messages_are_reassembled(raw):
    client = raw()
    connected(client)
    send_fragments(client, json.dumps({"event": "pusher:subscribe",
                                       "data": {"channel": "frag-e"}}), 3)
    assert client.recv_event("pusher_internal:subscription_succeeded")["channel"] == "frag-e"
    # A multi-byte character split across two frames, and a control frame in between.
    send_fragments(client, '{"event":"pusher:ping","data":{"x":"ééééé"}}', 4,
                   ping_between=True)
    opcode, payload = client.ws.recv_data(control_frame=True)
    assert (opcode, payload) == (websocket.ABNF.OPCODE_PONG, b"between")
    assert client.recv_event("pusher:pong")


def test_fragments_over_the_size_limit_close_with_1009(raw):
    client = raw()
    connected(client)
    send_fragments(client, padded_ping(65537), 3)
    assert client.recv_close()[0] == 1009


@pytest.mark.parametrize("code", [1000, 3001, 4321])
def test_client_close_frame_is_echoed(raw, code):
    client = raw()
    connected(client)
    client.ws.send_close(code, b"bye")
    assert client.recv_close()[0] == code


def test_websocket_ping_gets_pong(raw):
    client = raw()
    connected(client)
    client.ws.ping(b"hello")
    assert client.ws.recv_data(control_frame=True) == (websocket.ABNF.OPCODE_PONG, b"hello")


# ---------------------------------------------------------------- unix socket

def test_unix_socket_serves_two_clients(start_server, tmp_path):
    path = str(tmp_path / "bunpulse.sock")
    start_server(env={"BUNPULSE_HOST": f"unix:{path}"})
    assert unix_request(path, "GET /health").startswith(b"HTTP/1.1 200")
    url = f"ws://localhost/app/{KEY}?protocol=7"
    a = RawClient(url, socket=unix_socket(path))
    b = RawClient(url, socket=unix_socket(path))
    try:
        ids = [connected(a), connected(b)]
        assert ids[0] != ids[1]
        for client, socket_id in ((a, ids[0]), (b, ids[1])):
            raw_subscribe(client, socket_id, "private-unix")
            client.recv_event("pusher_internal:subscription_succeeded")
        a.send({"event": "client-hi", "channel": "private-unix", "data": {"from": "a"}})
        b.send({"event": "client-hi", "channel": "private-unix", "data": {"from": "b"}})
        assert b.recv_event("client-hi")["data"] == {"from": "a"}
        assert a.recv_event("client-hi")["data"] == {"from": "b"}
        a.close()
        assert_alive(b)
    finally:
        a.close()
        b.close()
