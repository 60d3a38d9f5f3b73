"""Log lines for operators: text or JSON (`--log-format`), and throttled warnings for limits
that clients hit (one hostile client must not flood the log).

Clients choose much of what is logged (paths, header values, channel and event names, user
ids), so a text line never carries a control character as it is: a line feed, a carriage
return or a terminal escape would let a client forge a line or rewrite the operator's terminal.
`printable` escapes them; the text format applies it to the whole line (tracebacks aside), and
the places that log what a client sent apply it too, for a host application's own formatter.
JSON escapes them by itself."""
import json
import logging
import re
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match):
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text):
    """`text` with every control character escaped (`\\n`, `\\x1b`, `\\u2028`): one line."""
    text = str(text)
    return _CONTROLS.sub(_escape, text) if _CONTROLS.search(text) else text


class TextFormatter(logging.Formatter):
    """The text format, each record on one line of printable characters (a traceback, ours,
    keeps its lines)."""

    def __init__(self, fmt=TEXT_FORMAT, **kwargs):
        super().__init__(fmt, **kwargs)

    def formatMessage(self, record):  # noqa: N802 - logging's naming
        return printable(super().formatMessage(record))
# Attributes every LogRecord has; anything else was passed in `extra` and goes into JSON.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and any `extra` fields."""

    def format(self, record):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry = {"time": f"{stamp}.{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def formatter(log_format):
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure(level, log_format):
    """The embedded server's logging: one handler on stderr in the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # At debug, urllib3 logs each request's path and query: a webhook URL's token.
    logging.getLogger("urllib3").setLevel(max(root.level, logging.INFO))


def gunicorn_logconfig(level, log_format):
    """gunicorn's logconfig_dict: its own lines and BunPulse's in the same format."""
    fmt = {"()": "bunpulse.logs.JsonFormatter" if log_format == "json"
           else "bunpulse.logs.TextFormatter"}
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"bunpulse": fmt},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "bunpulse",
                                "stream": "ext://sys.stderr"}},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["stderr"],
                               "propagate": False},
            "gunicorn.access": {"level": level.upper(), "handlers": ["stderr"],
                                "propagate": False},
            "bunpulse": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
        },
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }


class Throttled:
    """A warning logged at most once per `every` seconds per key, saying how many were held
    back since the last line."""

    def __init__(self, logger, every=60.0):
        self._log = logger
        self._every = every
        self._last = {}   # key -> (time of the last line, occurrences held back since)

    def warning(self, key, message, *args, **extra):
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._every:
            self._last[key] = (last[0], last[1] + 1)
            return
        held = last[1] if last is not None else 0
        if len(self._last) > 10000:  # bounded however many keys clients make up
            self._last.clear()
        self._last[key] = (now, 0)
        if held:
            message += f" ({held} more since the last report)"
        self._log.warning(message, *args, extra=dict(extra, held_back=held))
