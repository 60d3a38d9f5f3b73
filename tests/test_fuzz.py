"""Property-based tests (hypothesis) of what parses client input: the Pusher message parser,
the HTTP API's JSON bodies, its signed query and the request head reader. Every input gets a
clear answer; no exception other than the documented one escapes.

The API's bodies and queries go two ways, each example both: into the WSGI app (Flask's test
client), and as raw HTTP/1.1 requests on a keep-alive socket to a real server, which reads them
as it reads every request (its own reader, in the event loop or a greenlet, the publish
answered there). Both answers must be clear, and the same."""
import http.client
import json
import os
import re
import socket
from urllib.parse import quote, quote_plus, urlencode

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bunpulse.api_query import NonCanonicalQuery, parse_query, string_to_sign
from bunpulse.config import load_settings
from bunpulse.errors import ClientError
from bunpulse.protocol import parse_client_frame
from bunpulse.request import Refusal, RequestReader
from conftest import APP_ID, KEY, SECRET

# Modest example counts: the whole file runs in seconds. No example database on disk.
FAST = settings(max_examples=200, deadline=None, database=None)
API = settings(max_examples=100, deadline=None, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])

# What JSON can carry: no NaN or infinity, no lone surrogates (orjson refuses them).
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12)


# ------------------------------------------------------------------ Pusher messages

@FAST
@given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1")),
                 json_values.map(json.dumps)))
def test_any_text_is_a_frame_or_a_client_error(text):
    try:
        frame = parse_client_frame(text)
    except ClientError as exc:
        assert exc.message and exc.code is None
        return
    assert isinstance(frame.event, str) and frame.event
    assert frame.channel is None or isinstance(frame.channel, str)


@FAST
@given(texts.filter(lambda e: e and not e.startswith("pusher:")), st.none() | texts,
       json_values)
def test_a_well_formed_message_is_read_as_sent(event, channel, data):
    message = {"event": event, "data": data}
    if channel is not None:
        message["channel"] = channel
    frame = parse_client_frame(json.dumps(message))
    assert (frame.event, frame.channel, frame.data) == (event, channel, data)


@FAST
@given(json_values)
def test_pusher_events_take_data_in_both_encodings(data):
    as_object = parse_client_frame(json.dumps({"event": "pusher:subscribe", "data": data}))
    as_string = parse_client_frame(json.dumps({"event": "pusher:subscribe",
                                               "data": json.dumps(data)}))
    assert as_object.data == data
    assert as_string.data == data


# ------------------------------------------------------------------ HTTP API bodies

class SocketApi:
    """Requests written as raw bytes on a keep-alive socket to a real server; answers read
    with http.client's parser (a new connection once the server says it closes one)."""

    def __init__(self, server):
        self.server, self.sock = server, None

    def request(self, method, target, body=b"", headers=None):
        head = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        request = (f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{head}"
                   f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body
        if self.sock is None:
            self.sock = socket.create_connection((self.server.host, self.server.port), 5)
        self.sock.sendall(request)
        answer = http.client.HTTPResponse(self.sock, method=method)
        answer.begin()
        answer.data = answer.read()
        answer.status_code = answer.status
        if answer.will_close:  # the server ends the connection after this answer
            self.close()
        return answer

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@pytest.fixture(scope="module")
def api_client():
    """The WSGI app, through Flask's test client."""
    from bunpulse.wsgi import create_app
    app = create_app(load_settings(None, environ={}, overrides={
        "app_id": APP_ID, "app_key": KEY, "app_secret": SECRET, "env_file": os.devnull}))
    return app.test_client()


@pytest.fixture(scope="module")
def socket_api(server):
    """A real server (the module's), on a socket."""
    client = SocketApi(server)
    yield client
    client.close()
    assert "Traceback" not in server.log()  # nothing escaped while it answered


@pytest.fixture
def both(api_client, socket_api):
    """request(method, target, body, headers) -> the answer of each way, both asserted clear
    and alike: a real server's reading of a request must not change what it answers."""
    def request(method, target, body=b"", headers=None):
        wsgi = api_client.open(target, method=method, data=body, headers=headers)
        real = socket_api.request(method, target, body, headers)
        for response in (wsgi, real):
            assert_clear_answer(response)
        assert (real.status_code, json.loads(real.data)) == \
            (wsgi.status_code, json.loads(wsgi.data)), target
        return real

    return request


EVENT_KEYS = ("name", "data", "channel", "channels", "socket_id", "info", "batch")
event_like = st.dictionaries(st.sampled_from(EVENT_KEYS), json_values, max_size=6)
channel_names = st.sampled_from(("a", "private-a", "presence-a", "cache-a", "#server-to-user-1",
                                 "x" * 201, "", "bad name")) | texts
near_valid = st.fixed_dictionaries(
    {"name": st.sampled_from(("ev", "")) | texts, "data": texts | json_values},
    optional={"channel": channel_names, "channels": st.lists(channel_names, max_size=120),
              "socket_id": st.sampled_from(("1.2", "1.", "x")) | texts,
              "info": st.sampled_from(("subscription_count", "user_count,x")) | json_values})
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: orjson.dumps(v)),
    event_like.map(lambda v: orjson.dumps(v)),
    near_valid.map(lambda v: orjson.dumps(v)),
    st.lists(event_like | near_valid, max_size=12).map(lambda b: orjson.dumps({"batch": b})),
)
POSTS = ("/apps/1/events", "/apps/1/batch_events", "/apps/1/users/u1/terminate_connections")


def assert_clear_answer(response):
    assert response.status_code < 500, response.data
    payload = json.loads(response.data)
    assert response.headers["Content-Type"].startswith("application/json")
    if response.status_code >= 400:
        assert isinstance(payload["error"], str) and payload["error"]


@API
@given(st.sampled_from(POSTS), bodies)
def test_any_api_body_gets_a_json_answer_never_a_500(both, path, body):
    both("POST", path, body, {"Authorization": f"Bearer {SECRET}",
                              "Content-Type": "application/json"})


@API
@given(st.sampled_from(POSTS), bodies, st.text(max_size=40))
def test_unsigned_or_badly_signed_bodies_get_a_json_401(both, path, body, query):
    response = both("POST", f"{path}?{urlencode({'auth_signature': query, 'auth_key': KEY})}",
                    body)
    assert response.status_code in (400, 401)


@API
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=40),
       st.dictionaries(st.sampled_from(("info", "filter_by_prefix", "auth_key")),
                       st.text(max_size=20), max_size=3))
@example(name="/0", query={})  # a doubled slash was a redirect with an HTML body
def test_any_api_query_gets_a_json_answer(both, name, query):
    target = f"/apps/1/channels/{quote(name, safe='')}" + (f"?{urlencode(query)}" if query
                                                           else "")
    both("GET", target, headers={"Authorization": f"Bearer {SECRET}"})


# ------------------------------------------------------------------ request heads

TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
names = st.text(alphabet="!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-",
                min_size=1, max_size=20)
values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40).map(
    lambda v: v.strip(" \t"))


def _read_all(chunks):
    """Every event the reader gives for these chunks (Request or Refusal), in order."""
    reader = RequestReader(4096, 10.0, 5.0, now=0.0)
    out = []
    for chunk in chunks:
        reader.receive_data(chunk, now=0.0)
        while True:
            event = reader.next_event()
            if event is None or (out and event is out[-1]):
                break
            out.append(event)
            if isinstance(event, Refusal):
                break
    return out


def _summary(events):
    return [("refused", e.status) if isinstance(e, Refusal) else
            (e.method, e.url, sorted(e.headers.items()), e.body) for e in events]


@FAST
@given(st.lists(st.binary(max_size=80), max_size=12),
       st.sampled_from((b"\r\n", b"\n")), st.booleans(), st.integers(1, 7))
def test_any_head_is_read_or_refused_never_raises_split_or_whole(lines, newline, ended, step):
    head = newline.join(lines) + (newline * 2 if ended else b"")
    whole = _read_all([head])
    split = _read_all([head[i:i + step] for i in range(0, len(head), step)])
    assert _summary(whole) == _summary(split)
    for event in whole:
        if isinstance(event, Refusal):
            assert event.status in (400, 413, 431, 501)
        else:
            assert all(TOKEN.match(name.decode("latin-1")) for name in event.headers)
            assert all(b"\r" not in value and b"\n" not in value
                       for value in event.headers.values())


@FAST
@given(st.lists(st.tuples(names, values), max_size=20), st.binary(max_size=100),
       st.integers(1, 9))
def test_well_formed_requests_are_read_exactly_split_or_whole(headers, body, step):
    head = "".join(f"{name}: {value}\r\n" for name, value in headers
                   if name.lower() not in ("content-length", "transfer-encoding", "upgrade",
                                           "connection", "expect"))
    data = (f"POST /x HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\n\r\n").encode(
        "latin-1") + body
    whole = _read_all([data])
    split = _read_all([data[i:i + step] for i in range(0, len(data), step)])
    assert _summary(whole) == _summary(split)
    assert len(whole) == 1 and not isinstance(whole[0], Refusal), whole
    assert whole[0].body == body


# ------------------------------------------------------------------ request framing (issue 21)

NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"  # a second request behind the first


def _pieces(data, step):
    return [data[i:i + step] for i in range(0, len(data), step)]


@FAST
@given(st.binary(max_size=300), st.lists(st.integers(1, 64), min_size=1, max_size=8),
       st.integers(1, 11))
def test_chunked_bodies_in_any_pieces_are_read_exactly(body, sizes, step):
    chunks, at = [], 0
    while at < len(body):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(b"%x\r\n%s\r\n" % (len(body[at:at + size]), body[at:at + size]))
        at += size
    data = (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(chunks) + b"0\r\n\r\n" + NEXT)
    whole = _read_all([data])
    assert _summary(whole) == _summary(_read_all(_pieces(data, step)))
    assert [getattr(event, "body", event) for event in whole] == [body, b""]
    assert whole[1].url == b"/next"  # the body's end is found exactly: nothing smuggled


framing = st.lists(st.sampled_from([
    "Content-Length: 5", "Content-Length: 0", "Content-Length: 7", "Content-Length: 5, 5",
    "Content-Length: -5", "Content-Length: +5", "Content-Length: 0x5",
    "Transfer-Encoding: chunked", "Transfer-Encoding: identity", "Transfer-Encoding: gzip",
    "Transfer-Encoding: chunked, identity", "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: CHUNKED", "Transfer-Encoding : chunked", " Transfer-Encoding: chunked",
    "Transfer_Encoding: chunked", "Content_Length: 5"]), max_size=3)


@FAST
@given(framing, st.integers(1, 13))
@example(["Transfer-Encoding: chunked", "Transfer-Encoding: identity"], 1)  # item 5's smuggle
@example(["Content-Length: 5", "Transfer-Encoding: chunked"], 1)
@example(["Transfer-Encoding: gzip, chunked"], 3)  # gzip would not be decoded: 501
@example(["Content_Length: 5"], 2)
def test_a_request_is_framed_one_way_or_refused(lines, step):
    """Whatever framing headers a request carries, the reader either refuses it with 400 or
    reads it as one body of one length, split or whole: never two readings that a proxy in
    front could disagree with (request smuggling)."""
    body = b"5\r\nhello\r\n0\r\n\r\n"  # a chunked body that is also 5 + 10 bytes of text
    data = b"POST /x HTTP/1.1\r\nHost: x\r\n" + "".join(
        line + "\r\n" for line in lines).encode() + b"\r\n" + body + NEXT
    whole = _read_all([data])
    assert _summary(whole) == _summary(_read_all(_pieces(data, step)))
    first = whole[0]
    if isinstance(first, Refusal):
        assert first.status in (400, 501), first  # 501: a coding other than chunked
        return
    te = [value for name, value in first.headers.items() if name == b"transfer-encoding"]
    cl = [value for name, value in first.headers.items() if name == b"content-length"]
    assert not (te and cl), f"both framings accepted: {lines}"
    assert b"_" not in b"".join(first.headers), f"an underscore header kept: {lines}"
    if te:
        assert te[0].lower() == b"chunked", lines
        assert first.body == b"hello"
    else:
        assert first.body == body[:int(cl[0])] if cl else first.body == b""


# ------------------------------------------------------------------ the signed query

query_keys = st.from_regex(r"[a-z0-9_.~-]{1,12}", fullmatch=True)
query_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                              blacklist_characters="&"), max_size=20)
canonical_queries = st.dictionaries(query_keys, query_values, max_size=8)
# Values the libraries send as they are (no character that a query would decode).
plain_values = st.text(alphabet="abcXYZ019_.~-,=@:!*()'$;/?", max_size=20)


def serialised(params, escape=True):
    return "&".join(f"{k}={quote_plus(v) if escape else v}" for k, v in params.items())


def signed_as_pusher_says(params):
    """The spec's QUERY, written out independently of bunpulse."""
    return "&".join(f"{k}={params[k]}" for k in sorted(params) if k != "auth_signature")


@FAST
@given(canonical_queries, st.booleans())
def test_a_canonical_query_is_read_as_sent_and_signs_as_the_spec_says(params, escape):
    """Escaped (as requests sends it) or not: read back as sent, in any order, and signed as
    the spec writes it."""
    read = parse_query(serialised(params))
    assert read == params
    assert string_to_sign(read) == signed_as_pusher_says(params)


@FAST
@given(st.dictionaries(query_keys, plain_values, max_size=8))
def test_a_query_sent_raw_as_the_libraries_do_is_read_as_sent(params):
    assert parse_query(serialised(params, escape=False)) == params


@FAST
@given(st.text(alphabet="aAbB_=&%2632Df+-x ", max_size=40))
def test_any_query_accepted_reserialises_canonically_and_signs_the_same(query):
    try:
        read = parse_query(query)
    except NonCanonicalQuery as exc:
        assert str(exc).startswith("Non-canonical query")
        return
    assert all(key == key.lower() and "%" not in key and "&" not in value
               for key, value in read.items())
    again = parse_query(serialised(read))
    assert again == read
    assert string_to_sign(again) == string_to_sign(read) == signed_as_pusher_says(read)


@FAST
@given(canonical_queries.filter(lambda p: any(c.isalpha() for k in p for c in k)),
       st.data())
def test_case_variants_and_duplicates_are_always_refused(params, data):
    key = data.draw(st.sampled_from([k for k in params if any(c.isalpha() for c in k)]))
    at = data.draw(st.sampled_from([i for i, c in enumerate(key) if c.isalpha()]))
    variant = key[:at] + key[at].upper() + key[at + 1:]
    with pytest.raises(NonCanonicalQuery, match="lower-case"):
        parse_query(serialised({**params, variant: params[key]}))
    with pytest.raises(NonCanonicalQuery, match="lower-case"):
        parse_query(serialised({variant if k == key else k: v for k, v in params.items()}))
    duplicate = data.draw(query_values)
    with pytest.raises(NonCanonicalQuery, match="more than once"):
        parse_query(serialised(params) + f"&{key}={quote_plus(duplicate)}")


@FAST
@given(canonical_queries.filter(lambda p: len(p) >= 2))
def test_pairs_folded_into_one_key_or_value_are_refused(params):
    """Two pairs hidden in one, by encoding the '=' and '&' between them: the same string to
    sign, another query to read."""
    (k1, v1), (k2, v2) = list(params.items())[:2]
    rest = {k: v for k, v in list(params.items())[2:]}
    folded_key = serialised({quote(f"{k1}={v1}&{k2}", safe=""): v2, **rest}, escape=False)
    folded_value = serialised({k1: f"{v1}&{k2}={v2}", **rest})
    for query in (folded_key, folded_value):
        with pytest.raises(NonCanonicalQuery):
            parse_query(query)
