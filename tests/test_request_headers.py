"""The request-header reader that replaces pywsgi's email-based one: same answers as
http.client on good headers, a 400 on malformed ones, and the server keeps serving."""
import http.client
import io
import socket

import pytest
import requests

from bunpulse.request_headers import MAX_HEADERS, RequestHeaders

GOOD = [
    b"Host: localhost:6001\r\nUser-Agent: python-requests/2.32.3\r\nAccept-Encoding: gzip\r\n"
    b"Accept: */*\r\nConnection: keep-alive\r\nContent-Length: 12\r\n"
    b"Content-Type: application/json\r\n\r\n",
    b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"X-Dup: one\r\nx-dup: two\r\nX-Colon: a:b:c\r\nX-Empty:\r\nX-Spaces:   padded\r\n\r\n",
    b"Host: x\nX-Bare-LF: yes\n\n",
    b"X-Latin: caf\xe9\r\n\r\n",
    b"\r\n",
]


@pytest.mark.parametrize("block", GOOD)
def test_reads_what_http_client_reads(block):
    ours = RequestHeaders.read(io.BytesIO(block + b"body"))
    reference = http.client.parse_headers(io.BytesIO(block + b"body"))
    assert ours.status == ""
    assert ours.items() == reference.items()
    for name in {k for k, _ in reference.items()} | {"missing"}:
        assert ours.get(name) == reference.get(name)
        assert ours.get(name.upper()) == reference.get(name.upper())


def test_stops_at_the_blank_line_and_edits_like_a_message():
    stream = io.BytesIO(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"
                        b"Content-Type: text/plain\r\nX-Folded: a\r\n  b\r\n\r\nbody")
    headers = RequestHeaders.read(stream)
    assert stream.read() == b"body"
    assert headers.typeheader == "text/plain" and headers.get("x-folded") == "a b"
    assert "content-length" in headers
    del headers["CONTENT-LENGTH"]
    assert headers.getheader("Content-Length") is None and "content-length" not in headers
    assert headers.headers == ["Transfer-Encoding: chunked\r\n", "Content-Type: text/plain\r\n",
                               "X-Folded: a b\r\n"]


@pytest.mark.parametrize("block", [
    b"Host: x\r\nno colon here\r\n\r\n",
    b"Host : x\r\n\r\n",
    b": empty name\r\n\r\n",
    b" leading continuation\r\n\r\n",
    b"X-Long: " + b"a" * 70000 + b"\r\n\r\n",
    b"".join(b"X-%d: v\r\n" % n for n in range(MAX_HEADERS + 1)) + b"\r\n",
])
def test_malformed_headers_get_a_status(block):
    assert RequestHeaders.read(io.BytesIO(block)).status


def test_exactly_the_limit_of_headers_is_fine():
    block = b"".join(b"X-%d: v\r\n" % n for n in range(MAX_HEADERS)) + b"\r\n"
    headers = RequestHeaders.read(io.BytesIO(block))
    assert headers.status == "" and len(headers.items()) == MAX_HEADERS


@pytest.mark.parametrize("headers", [
    b"Host: x\r\nno colon here\r\n",
    b"".join(b"X-%d: v\r\n" % n for n in range(MAX_HEADERS + 1)),
    b"Host: x\r\nContent-Length: abc\r\n",
])
def test_server_answers_400_and_keeps_serving(server, headers):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n" + headers + b"\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
    assert requests.get(server.url + "/health", timeout=5).json()["ok"] is True
