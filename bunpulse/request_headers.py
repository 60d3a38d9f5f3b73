"""HTTP request headers read without the email package.

pywsgi parses every request's headers with `http.client.parse_headers`, that is with the email
parser: a tenth of the CPU of an HTTP API publish and of a WebSocket handshake. This reads the
same lines with the same limits, and offers the little of the old `mimetools.Message` API that
pywsgi and gevent-websocket use. Malformed headers get a status, which pywsgi answers with 400
(the email parser would have taken the rest of the headers for a body).
"""
import re

MAX_LINE = 65536   # http.client's limits
MAX_HEADERS = 100
MAX_HEAD = 65536   # bytes of a request head, request line included; past it, 431
TOO_LARGE = "Request head larger than 64 KiB"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


class RequestHeaders:
    __slots__ = ("_pairs", "status")

    def __init__(self, pairs=(), status=""):
        self._pairs = list(pairs)
        self.status = status  # not empty: the headers are malformed, pywsgi answers 400

    @classmethod
    def read(cls, fp, budget=MAX_HEAD):
        """The header lines up to the blank one, in at most `budget` bytes (else the status
        is TOO_LARGE). Folded lines are gathered and joined once: linear in their number."""
        pairs = []
        folded = None  # the continuation lines of the last header
        while True:
            line = fp.readline(min(MAX_LINE, budget) + 1)
            budget -= len(line)
            if budget < 0:
                return cls(status=TOO_LARGE)
            if len(line) > MAX_LINE:
                return cls(status="Line too long")
            if line[:1] in (b" ", b"\t"):  # obsolete line folding: unfold with a space
                if not pairs:
                    return cls(status="Continuation line without a header")
                if folded is None:
                    folded = [pairs[-1][1]]
                folded.append(line.decode("latin-1").strip())
                continue
            if folded is not None:
                pairs[-1] = (pairs[-1][0], " ".join(part for part in folded if part))
                folded = None
            if line in (b"\r\n", b"\n", b""):
                return cls(pairs)
            if len(pairs) >= MAX_HEADERS:
                return cls(status=f"More than {MAX_HEADERS} headers")
            name, colon, value = line.decode("latin-1").rstrip("\r\n").partition(":")
            if not colon or not _TOKEN.match(name):
                return cls(status="Malformed header line")
            pairs.append((name, value.strip(" \t")))

    def get(self, name, default=None):
        """The first value of a header, by case-insensitive name."""
        name = name.lower()
        for key, value in self._pairs:
            if key.lower() == name:
                return value
        return default

    getheader = get

    def __delitem__(self, name):
        name = name.lower()
        self._pairs = [pair for pair in self._pairs if pair[0].lower() != name]

    def __contains__(self, name):
        return self.get(name) is not None

    def items(self):
        return list(self._pairs)

    @property
    def headers(self):
        """The header lines, as mimetools.Message had them (pywsgi builds the environ from
        these)."""
        return [f"{name}: {value}\r\n" for name, value in self._pairs]

    @property
    def typeheader(self):
        return self.get("content-type")
