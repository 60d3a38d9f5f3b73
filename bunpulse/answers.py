"""HTTP/1.1 answers as bytes, for every answer BunPulse writes itself (the publish calls, the
refusals of request.py and handshake.py, the WSGI answers of serving/handler.py)."""
import time
from http import HTTPStatus
from wsgiref.handlers import format_date_time

_date = [0, b""]


def http_date():
    """The Date header's value, formatted once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[:] = now, format_date_time(now).encode()
    return _date[1]


def status_line(status):
    """`status`: an int or a WSGI status string ("200 OK")."""
    if isinstance(status, int):
        status = f"{status} {HTTPStatus(status).phrase}"
    return b"HTTP/1.1 %s\r\n" % status.encode("latin-1")


def header_lines(headers):
    """WSGI (name, value) pairs as header lines."""
    return b"".join([b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
                     for name, value in headers])


def http_answer(status, headers, body=b"", keep_alive=True):
    """A whole answer with a Content-Length."""
    return b"".join([status_line(status), header_lines(headers),
                     b"Content-Length: %d\r\n" % len(body),
                     b"" if keep_alive else b"Connection: close\r\n",
                     b"Date: %s\r\n\r\n" % http_date(), body])
