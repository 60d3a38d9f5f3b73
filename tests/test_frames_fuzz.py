"""Property-based tests of the frame reader: random frame streams, valid or not, split at random
points, always end in messages, a clean close or a violation; never an exception escaping, and
never a reader that waits for bytes a finished stream will not bring. Then the same streams
against a running server, over a real socket."""
import os
import socket
import struct
import time

from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from bunpulse.frames import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
                             Close, FrameParser, PongDue, Violation)
from conftest import KEY, RawClient

MAX = 4096  # the parser's message size limit in these tests
SERVER_MAX = 65536  # the server's (--max-message-size's default)


def masked(payload, opcode, fin=True, rsv=0, mask=True, length=None):
    length = len(payload) if length is None else length
    first = bytes(((0x80 if fin else 0) | rsv | opcode,))
    bit = 0x80 if mask else 0
    if length < 126:
        head = first + bytes((bit | length,))
    elif length < 0x10000:
        head = first + bytes((bit | 126,)) + struct.pack("!H", length)
    else:
        head = first + bytes((bit | 127,)) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


text = st.text(max_size=300).map(lambda s: s.encode())
valid_frame = st.one_of(
    text.map(lambda p: masked(p, OP_TEXT)),
    st.binary(max_size=300).map(lambda p: masked(p, OP_BINARY)),
    st.binary(max_size=125).map(lambda p: masked(p, OP_PING)),
    st.binary(max_size=125).map(lambda p: masked(p, OP_PONG)),
    st.lists(text, min_size=2, max_size=4).map(
        lambda parts: b"".join(masked(p, OP_TEXT if i == 0 else OP_CONTINUATION,
                                      fin=i == len(parts) - 1) for i, p in enumerate(parts))),
)
bad_frame = st.one_of(
    st.binary(max_size=40),                                            # noise
    text.map(lambda p: masked(p, OP_TEXT, mask=False)),                # unmasked
    text.map(lambda p: masked(p, OP_TEXT, rsv=0x40)),                  # reserved bit
    st.sampled_from((0x3, 0x7, 0xB, 0xF)).map(lambda op: masked(b"x", op)),  # unknown opcode
    st.binary(min_size=126, max_size=200).map(lambda p: masked(p, OP_PING)),  # big control
    text.map(lambda p: masked(p, OP_CONTINUATION)),                    # orphan continuation
    st.integers(MAX + 1, 2 ** 63).map(lambda n: masked(b"", OP_TEXT, length=n)[:14]),  # too big
    st.binary(min_size=1, max_size=20).map(lambda p: masked(b"\xff" + p, OP_TEXT)),  # bad UTF-8
    st.binary(max_size=123).map(lambda p: masked(p, OP_CLOSE)),        # a close, any payload
)
stream = st.lists(st.one_of(valid_frame, valid_frame, bad_frame), max_size=12).map(b"".join)


def split(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for point in points + [len(data)]:
        chunks.append(data[last:point])
        last = point
    return chunks


def events_of(chunks, limit=MAX):
    parser = FrameParser(limit)
    events = []
    for chunk in chunks:
        parser.receive_data(chunk)
        events += parser.events_received()
        # What the server's next read asks for (websocket.py): never nothing, and never more
        # than the largest frame the limit lets through (its head and mask included).
        assert 1 <= parser.missing <= limit + 14, parser.missing
    return parser, events


def frame_spans(data):
    """(start, end) of each frame of a stream of whole, masked client frames."""
    spans, at = [], 0
    while at < len(data):
        n, head = data[at + 1] & 0x7F, 2
        if n == 126:
            n, head = struct.unpack("!H", data[at + 2:at + 4])[0], 4
        elif n == 127:
            n, head = struct.unpack("!Q", data[at + 2:at + 10])[0], 10
        spans.append((at, at + head + 4 + n))
        at += head + 4 + n
    return spans


def missing_after(data, received):
    """The bytes the reader needs after `received` bytes of `data` (whole frames) before it
    can go on: the rest of a frame's first two bytes, of its extended length, or of the
    frame; a frame's first two bytes at a boundary."""
    for start, end in frame_spans(data):
        if start <= received < end:
            got = received - start
            if got < 2:
                return 2 - got
            n = data[start + 1] & 0x7F
            head = 4 if n == 126 else 10 if n == 127 else 2
            return head - got if got < head else end - received
    return 2


def comparable(events):
    out = []
    for event in events:
        if isinstance(event, PongDue):
            out.append(("pong", event.frame))
        elif isinstance(event, Close):
            out.append(("close", event.code))
        elif isinstance(event, Violation):
            out.append(("violation", event.code))
        else:
            out.append(event)
    return out


@settings(max_examples=400, deadline=None)
@given(stream, st.lists(st.integers(0, 1 << 16), max_size=20))
def test_any_stream_split_anywhere_reads_the_same_and_ends_cleanly(data, cuts):
    whole_parser, whole = events_of([data])
    parser, pieces = events_of(split(data, cuts))
    assert comparable(pieces) == comparable(whole)
    for event in whole[:-1]:  # a close or a violation can only be the last event
        assert isinstance(event, (str, bytes, PongDue))
    if whole and isinstance(whole[-1], (Close, Violation)):
        parser.receive_data(os.urandom(64))  # what follows an end is ignored
        assert parser.events_received() == []
    for message in whole:
        if isinstance(message, Violation):
            assert 1002 <= message.code <= 1009


@settings(max_examples=200, deadline=None)
@given(st.lists(valid_frame, max_size=10))
def test_valid_frames_give_every_message_whatever_the_split(frames):
    data = b"".join(frames)
    _, one_by_one = events_of([data[i:i + 1] for i in range(len(data))])
    _, whole = events_of([data])
    assert comparable(one_by_one) == comparable(whole)
    assert not any(isinstance(e, (Close, Violation)) for e in whole)
    assert len(whole) == len(frames) - sum(f[0] & 0x0F == OP_PONG for f in frames)


@settings(max_examples=200, deadline=None)
@given(st.lists(valid_frame, max_size=10), st.lists(st.integers(0, 1 << 12), max_size=20))
def test_missing_is_exactly_what_the_next_step_needs(frames, cuts):
    """The server sizes its next read by `missing` (websocket.py): after any prefix of a
    stream it is exactly the rest of the frame's head, or of the frame once its length is
    known, so a read asks neither for bytes the client will not send yet nor for less than
    the frame being read."""
    data = b"".join(frames)
    parser, received = FrameParser(MAX), 0
    for chunk in split(data, cuts):
        parser.receive_data(chunk)
        parser.events_received()
        received += len(chunk)
        assert parser.missing == missing_after(data, received), received


# ---------------------------------------------------------------- against the server

PING = masked(b'{"event":"pusher:ping","data":{}}', OP_TEXT)


PING_TEXT = '{"event":"pusher:ping","data":{}}'


def _server_frames(data):
    """(opcode, payload) of the complete unmasked frames at the start of data."""
    frames, pos = [], 0
    while len(data) - pos >= 2:
        length, head = data[pos + 1] & 0x7F, 2
        if length == 126:
            length, head = struct.unpack("!H", data[pos + 2:pos + 4])[0], 4
        elif length == 127:
            length, head = struct.unpack("!Q", data[pos + 2:pos + 10])[0], 10
        if len(data) - pos < head + length:
            break
        frames.append((data[pos] & 0x0F, data[pos + head:pos + head + length]))
        pos += head + length
    return frames


def _session(server, chunks):
    """Send the chunks on a fresh connection, then a pusher:ping; return what the server did:
    'open' (it answered the ping), the code of its close frame, or 'ended' (no close frame:
    the stream held a close of its own and the server answered it, or the socket ended)."""
    client = RawClient(server.ws_url + f"/app/{KEY}?protocol=7")
    sock = client.ws.sock
    try:
        client.recv()  # connection_established
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.sendall(PING)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed first: what it sent is still readable
        sock.settimeout(5)
        deadline = time.monotonic() + 5
        data = b""
        while time.monotonic() < deadline:
            for opcode, payload in _server_frames(data):
                if opcode == OP_CLOSE:
                    return struct.unpack("!H", payload[:2])[0]
                if opcode == OP_TEXT and b"pusher:pong" in payload:
                    return "open"
            try:
                got = sock.recv(65536)
            except ConnectionResetError:
                return "ended"
            if not got:
                return "ended"
            data += got
        raise AssertionError(f"no answer within 5 s: {data[-200:]!r}")
    finally:
        client.close()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.generate])  # no shrinking: each example is a connection
@given(stream, st.lists(st.integers(0, 1 << 16), max_size=6))
def test_the_server_answers_any_stream_with_messages_or_a_close(server, data, cuts):
    _, events = events_of([data + PING], SERVER_MAX)  # what the server reads
    ends = [e for e in events if isinstance(e, (Close, Violation))]
    assume(ends or events[-1:] == [PING_TEXT])  # else the ping only completes a frame
    outcome = _session(server, [c for c in split(data, cuts) if c])
    if not ends:
        assert outcome == "open"
    elif isinstance(ends[0], Violation):
        assert outcome == ends[0].code
    else:  # the client's own close: answered with its code (or 1000), then the socket ends
        assert outcome in (ends[0].reply_code, "ended")
    assert "Traceback" not in server.log()
