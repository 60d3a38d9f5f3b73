"""bunpulse.frames with no socket: the server's frames, and the parser of a client's stream fed
bytes however they are split or coalesced."""
import os
import struct

import pytest

from bunpulse.frames import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
                             Close, FrameParser, PongDue, Violation, build_frame, close_frame)


def client_frame(payload, opcode=OP_TEXT, fin=True, rsv=0, masked=True, length=None):
    """A frame as a client sends it: masked with a random key."""
    length = len(payload) if length is None else length
    first = bytes(((0x80 if fin else 0) | rsv | opcode,))
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head = first + bytes((mask_bit | length,))
    elif length < 0x10000:
        head = first + bytes((mask_bit | 126,)) + struct.pack("!H", length)
    else:
        head = first + bytes((mask_bit | 127,)) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def summary(events):
    """Events as comparable values."""
    out = []
    for event in events:
        if isinstance(event, (str, bytes)):
            out.append(event)
        elif isinstance(event, PongDue):
            out.append(("pong", event.frame))
        elif isinstance(event, Close):
            out.append(("close", event.code, event.reply_code))
        else:
            assert isinstance(event, Violation)
            out.append(("violation", event.code, event.reason, event.payload_unread))
    return out


def parse(*chunks, max_message_size=1 << 17):
    parser = FrameParser(max_message_size)
    events = []
    for chunk in chunks:
        parser.receive_data(chunk)
        events += parser.events_received()
    return summary(events)


# A stream with every kind of frame: short and 16-bit lengths, a fragmented message with
# a ping between its fragments, a UTF-8 character split across fragments, then a close.
STREAM = b"".join([
    client_frame(b'{"event":"pusher:ping","data":{}}'),
    client_frame(b"x" * 300),
    client_frame(b"\x00\x01" * 200, OP_BINARY),
    client_frame("caf\u00e9 ".encode()[:4], fin=False),
    client_frame(b"ping!", OP_PING),
    client_frame("caf\u00e9 ".encode()[4:], OP_CONTINUATION, fin=False),
    client_frame(b"end", OP_CONTINUATION),
    client_frame(b"", OP_PONG),
    client_frame(b"", OP_TEXT),
    client_frame(struct.pack("!H", 4000) + b"bye", OP_CLOSE),
])
EXPECTED = [
    '{"event":"pusher:ping","data":{}}',
    "x" * 300,
    b"\x00\x01" * 200,
    ("pong", build_frame(b"ping!", OP_PONG)),
    "caf\u00e9 end",
    "",
    ("close", 4000, 4000),
]


def test_a_stream_in_one_piece():
    assert parse(STREAM) == EXPECTED


def test_a_stream_split_at_every_offset():
    for offset in range(len(STREAM) + 1):
        assert parse(STREAM[:offset], STREAM[offset:]) == EXPECTED, offset


def test_a_stream_byte_by_byte_and_in_odd_chunks():
    assert parse(*(STREAM[i:i + 1] for i in range(len(STREAM)))) == EXPECTED
    assert parse(*(STREAM[i:i + 7] for i in range(0, len(STREAM), 7))) == EXPECTED


def test_a_64_bit_length_frame_in_pieces():
    frame = client_frame(b"\x00\x01" * 35000, OP_BINARY)
    for offset in (1, 2, 5, 9, 10, 13, 14, 4096, len(frame) - 1, len(frame)):
        assert parse(frame[:offset], frame[offset:]) == [b"\x00\x01" * 35000], offset


def test_short_frames_split_at_every_pair_of_offsets():
    stream = client_frame(b"ab") + client_frame(b"", OP_PING) + client_frame(b"cd" * 70)
    expected = ["ab", ("pong", build_frame(b"", OP_PONG)), "cd" * 70]
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert parse(stream[:i], stream[i:j], stream[j:]) == expected, (i, j)


@pytest.mark.parametrize("length", [101, 300, 70000, 1 << 40])
def test_too_big_is_refused_from_the_header_alone(length):
    frame = client_frame(b"", length=length)
    header = frame[:len(frame) - 4]  # no mask, no payload: only the header has arrived
    parser = FrameParser(max_message_size=100)
    for i in range(len(header) - 1):
        parser.receive_data(header[i:i + 1])
        assert parser.events_received() == []
    parser.receive_data(header[-1:])
    assert summary(parser.events_received()) == [("violation", 1009, "Message too big", True)]
    parser.receive_data(b"\x00" * 1000)  # the rest is ignored
    assert parser.events_received() == []


def test_the_limit_counts_every_fragment_of_a_message():
    assert parse(client_frame(b"a" * 60, fin=False),
                 client_frame(b"b" * 40, OP_CONTINUATION),
                 max_message_size=100) == ["a" * 60 + "b" * 40]
    assert parse(client_frame(b"a" * 60, fin=False),
                 client_frame(b"b" * 41, OP_CONTINUATION),
                 max_message_size=100) == [("violation", 1009, "Message too big", True)]
    # Control frames are not messages: a ping is never too big.
    assert parse(client_frame(b"p" * 125, OP_PING), max_message_size=10) == [
        ("pong", build_frame(b"p" * 125, OP_PONG))]


@pytest.mark.parametrize("frames, reason", [
    ([client_frame(b"hi", rsv=0x40)], "Reserved bits must be 0"),
    ([client_frame(b"hi", masked=False)], "Client frames must be masked"),
    ([client_frame(b"hi", 0x3)], "Unknown opcode"),
    ([client_frame(b"hi", 0xB)], "Unknown opcode"),  # a reserved control opcode
    ([client_frame(b"hi", OP_PING, fin=False)], "Invalid control frame"),
    ([client_frame(b"", OP_PING, length=126)], "Invalid control frame"),
    ([client_frame(b"hi", OP_CONTINUATION)], "Continuation without a message"),
    ([client_frame(b"a", fin=False), client_frame(b"b")], "New message inside a fragmented one"),
])
def test_protocol_violations_close_with_1002_and_end_parsing(frames, reason):
    stream = client_frame(b"before") + b"".join(frames) + client_frame(b"after")
    assert parse(stream) == ["before", ("violation", 1002, reason, True)]
    for offset in range(len(stream) + 1):
        assert parse(stream[:offset], stream[offset:]) == parse(stream), offset


def test_invalid_utf8_closes_with_1007():
    stream = client_frame(b"ok") + client_frame(b"\xff\xfe") + client_frame(b"after")
    assert parse(stream) == ["ok", ("violation", 1007, "Invalid UTF-8", False)]
    # A character split across fragments is valid; one cut short at the end is not.
    euro = "\u20ac".encode()
    assert parse(client_frame(euro[:1], fin=False),
                 client_frame(euro[1:], OP_CONTINUATION)) == ["\u20ac"]
    assert parse(client_frame(euro[:2])) == [("violation", 1007, "Invalid UTF-8", False)]


def test_binary_messages_are_not_decoded():
    assert parse(client_frame(b"\xff\xfe", OP_BINARY)) == [b"\xff\xfe"]


@pytest.mark.parametrize("payload, code, reply", [
    (b"", 1000, 1000),
    (struct.pack("!H", 1001), 1001, 1001),
    (struct.pack("!H", 4200) + b"reason", 4200, 4200),
    (struct.pack("!H", 1005), 1005, 1000),  # reserved: never sent on the wire
    (struct.pack("!H", 1006), 1006, 1000),
    (struct.pack("!H", 999), 999, 1000),
    (struct.pack("!H", 5000), 5000, 1000),
])
def test_close_reports_the_code_and_the_reply(payload, code, reply):
    stream = client_frame(payload, OP_CLOSE) + client_frame(b"ignored")
    assert parse(stream) == [("close", code, reply)]


def test_missing_counts_the_bytes_a_frame_still_needs():
    frame = client_frame(b"z" * 1000)
    parser = FrameParser()
    assert parser.missing == 2
    parser.receive_data(frame[:10])
    assert parser.missing == len(frame) - 10
    parser.receive_data(frame[10:])
    assert parser.events_received() == ["z" * 1000] and parser.missing == 2


@pytest.mark.parametrize("length, header", [
    (0, b"\x81\x00"), (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"),
    (65535, b"\x81\x7e\xff\xff"), (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
])
def test_build_frame_uses_the_shortest_length(length, header):
    frame = build_frame(b"a" * length)
    assert frame == header + b"a" * length


def test_close_frame_carries_the_code_and_a_bounded_reason():
    frame = close_frame(4100, "r" * 300)
    assert frame[:4] == b"\x88\x7d\x10\x04" and len(frame) == 2 + 125
