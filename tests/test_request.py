"""The sans-I/O core before the WebSocket: request.RequestReader and handshake.accept, with no
socket. Every case is fed whole, one byte at a time, and coalesced with the requests around
it, and must give the same events each way."""
import base64
import hashlib

import pytest

from bunpulse import handshake
from bunpulse.request import CONTINUE, MAX_HEAD, Refusal, Request, RequestReader

MAX_BODY = 1000


def events(chunks, max_body=MAX_BODY, eof=False):
    reader = RequestReader(max_body, 10.0, 5.0, now=0.0)
    out, sent = [], b""
    for chunk in chunks:
        reader.receive_data(chunk, now=0.0)
        sent += reader.data_to_send()
        while True:
            event = reader.next_event()
            if event is None or event in out:
                break
            out.append(event)
            if isinstance(event, Refusal):
                break
    if eof:
        reader.receive_eof()
        event = reader.next_event()
        if event is not None and event not in out:
            out.append(event)
    return [_summary(event) for event in out], sent, reader


def _summary(event):
    if isinstance(event, Refusal):
        return ("refused", event.status)
    return (event.method, event.target, event.body, event.keep_alive, event.upgrade,
            event.ahead)


def every_split(data):
    """The same bytes whole, a byte at a time, and in three pieces."""
    third = max(1, len(data) // 3)
    return [[data], [data[i:i + 1] for i in range(len(data))],
            [data[:third], data[third:2 * third], data[2 * third:]]]


def same_every_way(data, **kwargs):
    results = [events(chunks, **kwargs)[0] for chunks in every_split(data)]
    assert results[0] == results[1] == results[2], results
    return results[0]


def post(body, extra=b""):
    return (b"POST /apps/1/events HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), extra, body))


def test_a_request_with_its_body_split_or_coalesced():
    assert same_every_way(post(b'{"a":1}')) == [
        ("POST", "/apps/1/events", b'{"a":1}', True, False, b"")]


def test_pipelined_requests_come_out_one_by_one_in_order():
    data = post(b"one") + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + post(b"three")
    assert [event[2] for event in same_every_way(data)] == [b"one", b"", b"three"]


def test_a_chunked_body_then_a_pipelined_request():
    data = (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4\r\n\r\n\r\n\r\n0\r\n\r\n" + post(b"next"))
    result = same_every_way(data)
    assert [event[2] for event in result] == [b"abc\r\n\r\n", b"next"]


def test_an_upgrade_keeps_the_bytes_behind_its_head():
    data = (b"GET /app/key?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n\x81\x80frame")
    [request] = same_every_way(data)
    assert request[4] is True and request[5] == b"\x81\x80frame"


@pytest.mark.parametrize("data, status", [
    (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400),                     # a folded line
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400),
    (b"GET / HTTP/1.1\nHost: x\n\n", 400),                               # bare line feeds
    (b"GARBAGE\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", 413),           # before the body
    (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
])
def test_refusals(data, status):
    assert same_every_way(data) == [("refused", status)]


def test_a_head_without_end_is_refused_once_past_the_cap_not_held():
    result, _, reader = events([b"GET / HTTP/1.1\r\nX: ", b"a" * (MAX_HEAD + 10)])
    assert result == [("refused", 431)]
    assert len(reader._buffer) <= MAX_HEAD + 32 or reader.next_event().status == 431


def test_a_head_of_exactly_the_cap_is_read():
    line = b"GET / HTTP/1.1\r\nX: "
    data = line + b"a" * (MAX_HEAD - len(line) - 4) + b"\r\n\r\n"
    assert len(data) == MAX_HEAD
    assert same_every_way(data)[0][0] == "GET"


def test_a_chunked_body_over_the_limit_is_refused_as_it_comes():
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024
    assert same_every_way(data) == [("refused", 413)]


def test_a_client_that_stops_mid_request_is_refused_and_one_that_stops_between_is_not():
    assert events([post(b"abc")[:-1]], eof=True)[0] == [("refused", 400)]
    assert events([post(b"abc")], eof=True)[0][0][2] == b"abc"
    assert events([b""], eof=True)[0] == []


def test_expect_100_continue_is_answered_by_the_reader():
    head = post(b"abc", b"Expect: 100-continue\r\n")
    result, sent, _ = events([head[:-3]])
    assert result == [] and sent == CONTINUE
    result, sent, _ = events([post(b"x" * 1001, b"Expect: 100-continue\r\n")[:120]])
    assert result == [("refused", 413)] and sent == b""


def test_the_deadline_runs_from_the_accept_then_from_each_answer_and_first_byte():
    reader = RequestReader(MAX_BODY, 10.0, 5.0, now=100.0)
    assert reader.deadline == 110.0
    reader.receive_data(post(b"abc"), now=101.0)
    assert isinstance(reader.next_event(), Request)
    reader.answered(now=102.0)
    assert reader.deadline == 107.0  # keep-alive: the next request's first byte
    reader.receive_data(b"GET / HT", now=104.0)
    assert reader.deadline == 114.0  # then the whole request


def test_the_environ_of_a_request():
    reader = RequestReader(MAX_BODY, 10.0, 5.0)
    reader.receive_data(b"GET /a%20b?x=1 HTTP/1.1\r\nHost: h\r\nX-Thing: 1\r\nX-Thing: 2\r\n"
                        b"Content-Type: text/plain\r\n\r\n")
    environ = reader.next_event().environ("10.0.0.1")
    assert environ["PATH_INFO"] == "/a b" and environ["QUERY_STRING"] == "x=1"
    assert environ["RAW_URI"] == "/a%20b?x=1" and environ["REMOTE_ADDR"] == "10.0.0.1"
    assert environ["HTTP_X_THING"] == "1,2" and environ["CONTENT_TYPE"] == "text/plain"


# ---------------------------------------------------------------- the handshake

KEY = base64.b64encode(b"0123456789abcdef").decode()


def headers(**overrides):
    values = {"upgrade": "websocket", "connection": "keep-alive, Upgrade",
              "sec-websocket-version": "13", "sec-websocket-key": KEY}
    values.update(overrides)
    return {name.encode(): value.encode() for name, value in values.items()}


def test_an_upgrade_is_accepted_with_the_rfc_accept_key():
    answer = handshake.accept("GET", "1.1", headers(), compression=True)
    expected = base64.b64encode(hashlib.sha1(
        KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    assert answer.answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: " + expected + b"\r\n" in answer.answer
    assert answer.deflate is False and answer.answer.endswith(b"\r\n\r\n")
    # RFC 6455's own example
    assert handshake.accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("offer, compression, wanted", [
    ("permessage-deflate; client_max_window_bits", True, True),
    ("permessage-deflate", False, False),
    ("permessage-deflate; server_max_window_bits=10", True, False),
    ("x-webkit-deflate-frame", True, False),
])
def test_permessage_deflate_is_negotiated_only_when_offered_and_configured(offer, compression,
                                                                          wanted):
    answer = handshake.accept("GET", "1.1", headers(**{"sec-websocket-extensions": offer}),
                              compression)
    assert answer.deflate is wanted
    assert (b"permessage-deflate; server_no_context_takeover" in answer.answer) is wanted


@pytest.mark.parametrize("method, version, overrides, status", [
    ("POST", "1.1", {}, 400),
    ("GET", "1.0", {}, 400),
    ("GET", "1.1", {"upgrade": "h2c"}, 400),
    ("GET", "1.1", {"sec-websocket-version": "99"}, 400),
    ("GET", "1.1", {"sec-websocket-key": "short"}, 400),
    ("GET", "1.1", {"sec-websocket-key": base64.b64encode(b"x" * 17).decode()}, 400),
])
def test_refused_upgrades(method, version, overrides, status):
    refusal = handshake.accept(method, version, headers(**overrides), compression=True)
    assert isinstance(refusal, Refusal) and refusal.status == status
    assert refusal.answer().startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_a_bad_version_is_answered_with_the_versions_served():
    refusal = handshake.accept("GET", "1.1", headers(**{"sec-websocket-version": "99"}), True)
    assert b"Sec-WebSocket-Version: 13, 8, 7\r\n" in refusal.answer()


def test_the_core_imports_no_io():
    import subprocess
    import sys
    code = ("import sys, bunpulse.request, bunpulse.handshake\n"
            "bad = [m for m in ('gevent', 'flask', 'redis', 'socket') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_environ_is_accepted_as_its_request_would_be():
    environ = {"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1",
               "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
               "HTTP_SEC_WEBSOCKET_VERSION": "13", "HTTP_SEC_WEBSOCKET_KEY": KEY,
               "HTTP_SEC_WEBSOCKET_EXTENSIONS": "permessage-deflate"}
    from_environ = handshake.accept_environ(environ, compression=True)
    from_headers = handshake.accept("GET", "1.1", headers(**{
        "sec-websocket-extensions": "permessage-deflate"}), compression=True)
    assert from_environ.answer == from_headers.answer and from_environ.deflate
    refused = handshake.accept_environ({**environ, "SERVER_PROTOCOL": "HTTP/1.0"}, True)
    assert isinstance(refused, Refusal) and refused.status == 400


@pytest.mark.parametrize("version, connection, kept", [
    ("1.1", None, True), ("1.1", "close", False), ("1.1", "Upgrade, Close", False),
    ("1.0", None, False), ("1.0", "keep-alive", True)])
def test_whether_the_connection_is_kept_after_a_request_with_or_without_a_body(
        version, connection, kept):
    extra = f"Connection: {connection}\r\n" if connection else ""
    for body in (b"", b"{}"):
        data = (f"POST /x HTTP/{version}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
                .encode() + body)
        reader = RequestReader(MAX_BODY, 10.0, 5.0)
        reader.receive_data(data)
        assert reader.next_event().keep_alive is kept, (version, connection, body)
