"""Clients that send their request head slowly, never, or far too big: each is closed (or
answered 431) in bounded time and at a bounded cost, and nobody else waits for them."""
import base64
import os
import socket
import time

import pytest
import requests

from conftest import KEY, RawClient, connected, free_port, wait_until  # noqa: F401

HANDSHAKE_MS = 800
KEEPALIVE_MS = 600
HEAD = (f"GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n").encode()


@pytest.fixture(scope="module")
def limited(request):
    from conftest import ServerProcess
    process = ServerProcess(env={"BUNPULSE_HANDSHAKE_TIMEOUT": str(HANDSHAKE_MS),
                                 "BUNPULSE_KEEPALIVE_TIMEOUT": str(KEEPALIVE_MS)})
    yield process
    process.stop()


def dial(server):
    sock = socket.create_connection((server.host, server.port), timeout=10)
    return sock


def closed_after(sock, limit=10):
    """Seconds until the server ends the connection (what it sent is read and dropped)."""
    start = time.monotonic()
    sock.settimeout(limit)
    while sock.recv(65536):
        pass
    return time.monotonic() - start


def assert_serves(server):
    client = RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
    try:
        assert connected(client)
    finally:
        client.close()


def test_a_silent_client_is_closed_after_the_handshake_timeout(limited):
    sock = dial(limited)
    waited = closed_after(sock)
    assert HANDSHAKE_MS / 1000 - 0.1 < waited < HANDSHAKE_MS / 1000 + 1.5
    sock.close()


def test_a_slowloris_is_closed_although_it_keeps_sending(limited):
    sock = dial(limited)
    start = time.monotonic()
    try:
        for byte in HEAD[:-2]:  # a byte every 50 ms: each read is quick, the head never ends
            sock.send(bytes((byte,)))
            time.sleep(0.05)
            if time.monotonic() - start > 5:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    waited = time.monotonic() - start
    if waited < 5:  # the server cut it off while it was still sending
        assert waited < HANDSHAKE_MS / 1000 + 1.5
    else:
        assert closed_after(sock, 2) < 0.5
    sock.close()


def test_many_silent_and_slow_clients_are_all_closed_while_others_connect(limited):
    idle = [dial(limited) for _ in range(150)]
    partial = [dial(limited) for _ in range(50)]
    for sock in partial:
        sock.sendall(HEAD[:40])
    started = time.monotonic()
    assert_serves(limited)  # a real client is not held up behind them
    assert time.monotonic() - started < 1.0
    for sock in idle + partial:
        assert closed_after(sock, HANDSHAKE_MS / 1000 + 3) < HANDSHAKE_MS / 1000 + 2.5
        sock.close()


def test_an_idle_keep_alive_connection_is_closed(limited):
    sock = dial(limited)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(5)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200")
    # Within the keep-alive timeout the connection serves a second request...
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.05)
    # ...then, idle, it is closed after the keep-alive timeout, not the handshake one.
    waited = closed_after(sock)
    assert KEEPALIVE_MS / 1000 - 0.15 < waited < KEEPALIVE_MS / 1000 + 1.0
    sock.close()


def test_a_request_head_past_64_kib_gets_431(limited):
    for filler in (
        b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 900) for n in range(80)),   # many headers
        b"X-Folded: start\r\n" + b" folded\r\n" * 10000,                    # folded lines
    ):
        sock = dial(limited)
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + filler + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(5)
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        assert b"64 KiB" in answer
        sock.close()
    assert "Traceback" not in limited.log()
    assert_serves(limited)


def test_a_head_with_folded_lines_is_refused_with_400(limited):
    """Obsolete line folding (RFC 9112 5.2 lets a server refuse it): 400, with a reason."""
    folded = b"X-Folded: start\r\n" + b" more\r\n" * 3000  # 21 KB
    sock = dial(limited)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + folded + b"Connection: close\r\n\r\n")
    sock.settimeout(5)
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request"), answer
    assert b"Malformed request" in answer
    sock.close()


def test_megabytes_of_folded_lines_cost_little(limited):
    """A head is searched for its end in linear time and stops at 64 KiB: 20 MB of folded
    lines are refused quickly and cost the server almost no CPU."""
    stat = f"/proc/{limited.proc.pid}/stat"

    def cpu():
        fields = open(stat).read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu()
    sock = dial(limited)
    chunk = b" x\r\n" * 16384
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n")
        for _ in range(320):  # 20 MB, unless the server stops reading first
            sock.sendall(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.close()
    wait_until(lambda: requests.get(limited.url + "/health", timeout=2).ok)
    assert cpu() - before < 0.5
