"""WebSocket frames (RFC 6455) without I/O: building the server's frames, and a parser of the
client's stream that is fed bytes and tells what they mean.

The parser has the shape of python-websockets' sans-I/O protocol: `receive_data(bytes)` as
they arrive, however the stream is split or coalesced, then `events_received()`. An event is
a `str` (a text message), `bytes` (a binary message), a `PongDue` (a ping to answer), a
`Close` (the client's close frame) or a `Violation` (close with its code). After a Close or a
Violation the parser ignores what follows. A frame too big for `max_message_size` is refused
(1009) as soon as its header is known, before its payload arrives.
"""
import struct
import zlib

from wsaccel.xormask import XorMaskerSimple

from .errors import WsClose

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_pack_short = struct.Struct("!H").pack
_pack_long = struct.Struct("!Q").pack
_unpack_short = struct.Struct("!H").unpack_from
_unpack_long = struct.Struct("!Q").unpack_from
_DEFLATE_TAIL = b"\x00\x00\xff\xff"  # removed from each deflated message (RFC 7692)
DEFLATE_MIN = 128  # smaller messages are sent as they are: deflating would not pay
_deflated = [None, None]  # the frames last deflated, and their deflated form


def deflated(frames):
    """`frames` (one or several server frames) as a permessage-deflate client gets them: each
    message's payload deflated without context takeover (RSV1 set), control frames and small
    messages as they are. Without context takeover one compression serves every socket: the
    last result is kept, since a fan-out hands the same object to every subscriber."""
    if frames is _deflated[0]:
        return _deflated[1]
    out, pos, end = [], 0, len(frames)
    while pos < end:
        first, length, head = frames[pos], frames[pos + 1] & 0x7F, 2
        if length == 126:
            length, head = _unpack_short(frames, pos + 2)[0], 4
        elif length == 127:
            length, head = _unpack_long(frames, pos + 2)[0], 10
        stop = pos + head + length
        if first & 0x0F in (OP_TEXT, OP_BINARY) and length >= DEFLATE_MIN:
            compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
            data = compressor.compress(frames[pos + head:stop]) + compressor.flush(
                zlib.Z_SYNC_FLUSH)
            out.append(build_frame(data[:-4], first & 0x0F, compressed=True))
        else:
            out.append(frames[pos:stop])
        pos = stop
    result = out[0] if len(out) == 1 else b"".join(out)
    _deflated[0], _deflated[1] = frames, result
    return result


# Close codes a peer must not send (RFC 6455 7.4.1): answered with a normal close instead.
_RESERVED_CLOSE_CODES = (1004, 1005, 1006, 1015)


def build_frame(payload, opcode=OP_TEXT, compressed=False):
    """One unmasked, final frame around `payload` (bytes); built once, sent to many sockets.
    `compressed`: the payload is deflated (RSV1 set, permessage-deflate)."""
    length = len(payload)
    first = bytes((0xC0 | opcode if compressed else 0x80 | opcode,))
    if length < 126:
        return first + bytes((length,)) + payload
    if length < 0x10000:
        return first + b"\x7e" + _pack_short(length) + payload
    return first + b"\x7f" + _pack_long(length) + payload


def close_frame(code, reason=""):
    # At most 123 bytes of reason fit in a control frame after the 2-byte code.
    return build_frame(_pack_short(code) + reason.encode()[:123], OP_CLOSE)


class PongDue:
    """The client pinged: send `frame` (the pong carrying the ping's payload)."""

    __slots__ = ("frame",)

    def __init__(self, payload):
        self.frame = build_frame(payload, OP_PONG)


class Close:
    """The client's close frame: `code` and `reason` are what it sent (1000 if no code),
    `reply_code` what the server's close frame answers."""

    __slots__ = ("code", "reason")

    def __init__(self, code, reason=""):
        self.code = code
        self.reason = reason

    @property
    def reply_code(self):
        code = self.code
        if 1000 <= code < 5000 and code not in _RESERVED_CLOSE_CODES:
            return code
        return WsClose.NORMAL


class Violation:
    """The stream broke the protocol: close with `code` and `reason`. `payload_unread`: the
    frame was refused before all of it was read, so the client may still be sending it."""

    __slots__ = ("code", "reason", "payload_unread")

    def __init__(self, code, reason, payload_unread=True):
        self.code = code
        self.reason = reason
        self.payload_unread = payload_unread


class FrameParser:
    """The client's side of one connection, as a stream of bytes in and events out."""

    __slots__ = ("max_message_size", "inflate", "_chunks", "_have", "_wanted", "_events",
                 "_opcode", "_parts", "_size", "_done", "_compressed")

    def __init__(self, max_message_size=1 << 16, inflate=False):
        self.max_message_size = max_message_size
        self.inflate = inflate  # permessage-deflate was negotiated: RSV1 marks a deflated message
        self._compressed = False  # the fragmented message in progress is deflated
        self._chunks = []     # bytes received and not parsed yet
        self._have = 0        # their total size
        self._wanted = 2      # bytes needed before parsing can go on (a frame's first two)
        self._events = []
        self._opcode = None   # the opcode of a fragmented message in progress
        self._parts = None    # its payloads so far
        self._size = 0        # their total size
        self._done = False

    @property
    def missing(self):
        """How many more bytes the reader needs before it can go on: the rest of a frame's
        head, or of the frame once its length is known; 2 between frames (never 0)."""
        return max(0, self._wanted - self._have)

    def receive_data(self, data):
        if self._done or not data:
            return
        self._chunks.append(data)
        self._have += len(data)
        if self._have >= self._wanted:
            self._parse()

    def events_received(self):
        """The events of the bytes received so far, oldest first (each is reported once)."""
        events = self._events
        if events:
            self._events = []
        return events

    def _parse(self):
        chunks = self._chunks
        buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        pos, end = 0, len(buf)
        wanted = 2
        while not self._done and end - pos >= 2:
            b1, b2 = buf[pos], buf[pos + 1]
            fin, opcode, length = b1 & 0x80, b1 & 0x0F, b2 & 0x7F
            if b1 & 0x70 and (b1 & 0x70 != 0x40 or not self.inflate
                              or opcode not in (OP_TEXT, OP_BINARY)):
                self._violation(WsClose.PROTOCOL_ERROR, "Reserved bits must be 0")
                break
            if not b2 & 0x80:
                self._violation(WsClose.PROTOCOL_ERROR, "Client frames must be masked")
                break
            if opcode >= OP_CLOSE:
                if opcode > OP_PONG:
                    self._violation(WsClose.PROTOCOL_ERROR, "Unknown opcode")
                    break
                if not fin or length > 125:
                    self._violation(WsClose.PROTOCOL_ERROR, "Invalid control frame")
                    break
            elif opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY):
                self._violation(WsClose.PROTOCOL_ERROR, "Unknown opcode")
                break
            head = 2
            if length == 126:
                head = 4
                if end - pos < head:
                    wanted = head
                    break
                length = _unpack_short(buf, pos + 2)[0]
            elif length == 127:
                head = 10
                if end - pos < head:
                    wanted = head
                    break
                length = _unpack_long(buf, pos + 2)[0]
            if opcode < OP_CLOSE and length > self.max_message_size - self._size:
                # Refused from the header alone: the payload is never waited for.
                self._violation(WsClose.MESSAGE_TOO_BIG, "Message too big")
                break
            size = head + 4 + length
            if end - pos < size:
                wanted = size
                break
            start = pos + head + 4
            payload = (XorMaskerSimple(buf[start - 4:start]).process(buf[start:pos + size])
                       if length else b"")
            pos += size
            self._frame(fin, opcode, payload, b1 & 0x40)
        if self._done or pos == end:
            chunks.clear()
            self._have = 0
        else:
            rest = buf[pos:] if pos else buf
            chunks[:] = (rest,)
            self._have = len(rest)
        self._wanted = wanted

    def _frame(self, fin, opcode, payload, compressed):
        if opcode >= OP_CLOSE:
            if opcode == OP_CLOSE:
                self._done = True
                if len(payload) >= 2:
                    self._events.append(Close(_unpack_short(payload)[0],
                                              bytes(payload[2:]).decode("utf-8", "replace")))
                else:
                    self._events.append(Close(WsClose.NORMAL))
            elif opcode == OP_PING:
                self._events.append(PongDue(payload))
            return  # a pong needs no answer
        if opcode == OP_CONTINUATION:
            if self._opcode is None:
                self._violation(WsClose.PROTOCOL_ERROR, "Continuation without a message")
                return
        elif self._opcode is not None:
            self._violation(WsClose.PROTOCOL_ERROR, "New message inside a fragmented one")
            return
        else:
            if fin:  # the common case: a whole message in one frame
                self._message(opcode, payload, compressed)
                return
            self._opcode, self._parts, self._compressed = opcode, [], compressed
        self._parts.append(payload)
        self._size += len(payload)
        if fin:
            parts, opcode = self._parts, self._opcode
            self._opcode, self._parts, self._size = None, None, 0
            self._message(opcode, b"".join(parts), self._compressed)

    def _message(self, opcode, payload, compressed):
        if compressed:
            # Inflated at most to the size limit: a small message that inflates past it (a
            # zip bomb) costs no more than a message of the limit's size.
            inflater = zlib.decompressobj(-15)
            try:
                payload = inflater.decompress(payload + _DEFLATE_TAIL, self.max_message_size + 1)
            except zlib.error:
                self._violation(WsClose.INVALID_PAYLOAD, "Invalid compressed data",
                                payload_unread=False)
                return
            if len(payload) > self.max_message_size:
                self._violation(WsClose.MESSAGE_TOO_BIG, "Message too big",
                                payload_unread=False)
                return
        if opcode == OP_TEXT:
            try:
                self._events.append(payload.decode("utf-8"))
            except UnicodeDecodeError:
                self._violation(WsClose.INVALID_PAYLOAD, "Invalid UTF-8", payload_unread=False)
        else:
            self._events.append(bytes(payload))

    def _violation(self, code, reason, payload_unread=True):
        self._done = True
        self._events.append(Violation(code, reason, payload_unread))
